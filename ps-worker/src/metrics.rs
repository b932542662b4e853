//! Classification metrics: logloss, AUC, accuracy, calibration for binary
//! tasks; logloss, top-1 accuracy and macro one-vs-rest AUC for
//! multi-class models.

use ps_common::config::JobConfig;
use serde::Serialize;

/// Metrics of predicted probabilities against 0/1 labels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BinaryMetrics {
    /// Number of examples.
    pub count: usize,
    /// Mean binary cross-entropy (probabilities clipped to [1e-7, 1 - 1e-7]).
    pub logloss: f64,
    /// Area under the ROC curve; ties count one half. NaN if one class is absent.
    pub auc: f64,
    /// Fraction of examples with `(p >= 0.5) == label`.
    pub accuracy: f64,
    /// Predicted positives over observed ones, `sum(p) / sum(y)`: 1 when
    /// the probabilities are right on average, above when they
    /// over-predict. NaN without a positive.
    pub calibration: f64,
}

impl BinaryMetrics {
    /// Computes the metrics; `probs` and `labels` have the same length.
    pub fn compute(probs: &[f32], labels: &[f32]) -> Self {
        assert_eq!(probs.len(), labels.len(), "one prediction per label");
        let n = probs.len();
        let mut logloss = 0f64;
        let mut correct = 0usize;
        let (mut predicted, mut observed) = (0f64, 0f64);
        for (&p, &y) in probs.iter().zip(labels) {
            let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
            let positive = y > 0.5;
            predicted += p;
            observed += f64::from(u8::from(positive));
            logloss -= if positive { p.ln() } else { (1.0 - p).ln() };
            correct += usize::from((p >= 0.5) == positive);
        }
        BinaryMetrics {
            count: n,
            logloss: logloss / n.max(1) as f64,
            auc: auc(probs, labels),
            accuracy: correct as f64 / n.max(1) as f64,
            calibration: if observed > 0.0 {
                predicted / observed
            } else {
                f64::NAN
            },
        }
    }

    /// The metrics of `job`'s model's predictions, one set per task:
    /// [`BinaryMetrics::compute`] for a binary head,
    /// [`BinaryMetrics::multiclass`] for a softmax over classes.
    pub fn for_job(probs: &[f32], labels: &[f32], job: &JobConfig) -> Vec<Self> {
        Self::per_task(probs, labels, &job.model.task_classes())
    }

    /// A multi-class model's metrics, for `classes` probabilities per
    /// example and one class index per label: `logloss` of the true
    /// class, `accuracy` top-1 (ties go to the lower class), `auc` the
    /// mean over classes of each class's one-vs-rest AUC (classes absent
    /// from the labels or present in all of them are left out; NaN when
    /// none is left). `calibration` is NaN.
    pub fn multiclass(probs: &[f32], labels: &[f32], classes: usize) -> Self {
        let k = classes.max(1);
        assert_eq!(probs.len(), labels.len() * k, "{k} probabilities per label");
        let n = labels.len();
        let mut logloss = 0f64;
        let mut correct = 0usize;
        for (row, &y) in probs.chunks(k).zip(labels) {
            let y = (y.max(0.0) as usize).min(k - 1);
            logloss -= f64::from(row[y]).clamp(1e-7, 1.0).ln();
            let top = (0..k).fold(0, |best, c| if row[c] > row[best] { c } else { best });
            correct += usize::from(top == y);
        }
        let aucs: Vec<f64> = (0..k)
            .map(|c| {
                let scores: Vec<f32> = probs.iter().skip(c).step_by(k).copied().collect();
                let is_c: Vec<f32> = labels
                    .iter()
                    .map(|&y| f32::from(u8::from(y as usize == c)))
                    .collect();
                auc(&scores, &is_c)
            })
            .filter(|a| !a.is_nan())
            .collect();
        BinaryMetrics {
            count: n,
            logloss: logloss / n.max(1) as f64,
            auc: if aucs.is_empty() {
                f64::NAN
            } else {
                aucs.iter().sum::<f64>() / aucs.len() as f64
            },
            accuracy: correct as f64 / n.max(1) as f64,
            calibration: f64::NAN,
        }
    }

    /// One set of metrics per task, for example-major `probs` (each
    /// task's `classes[t]` values in task order: 1 for a binary task) and
    /// `labels` (one per task).
    pub fn per_task(probs: &[f32], labels: &[f32], classes: &[u32]) -> Vec<Self> {
        let tasks = classes.len().max(1);
        let outputs = classes
            .iter()
            .map(|&c| c.max(1) as usize)
            .sum::<usize>()
            .max(1);
        let mut first = 0;
        classes
            .iter()
            .enumerate()
            .map(|(t, &c)| {
                let c = c.max(1) as usize;
                let task_labels: Vec<f32> = labels.iter().skip(t).step_by(tasks).copied().collect();
                let task_probs: Vec<f32> = probs
                    .chunks(outputs)
                    .flat_map(|row| {
                        row.get(first..first + c)
                            .unwrap_or_default()
                            .iter()
                            .copied()
                    })
                    .collect();
                first += c;
                if c > 1 {
                    Self::multiclass(&task_probs, &task_labels, c)
                } else {
                    Self::compute(&task_probs, &task_labels)
                }
            })
            .collect()
    }
}

/// One task's validation metrics in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskMetrics {
    /// Task name (`label` for single-task models).
    pub task: String,
    /// ROC AUC (a multi-class task: the macro one-vs-rest AUC).
    pub auc: f64,
    /// Mean logloss (a multi-class task: of the true class).
    pub logloss: f64,
    /// Accuracy at threshold 0.5 (a multi-class task: top-1).
    pub accuracy: f64,
}

impl TaskMetrics {
    /// Named metrics of each task.
    pub fn named(names: &[String], metrics: &[BinaryMetrics]) -> Vec<TaskMetrics> {
        names
            .iter()
            .zip(metrics)
            .map(|(task, m)| TaskMetrics {
                task: task.clone(),
                auc: m.auc,
                logloss: m.logloss,
                accuracy: m.accuracy,
            })
            .collect()
    }
}

/// ROC AUC by the rank-sum (Mann-Whitney) formula, averaging ranks of ties.
pub fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&y| y > 0.5).count() as f64;
    let negatives = scores.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let average_rank = (i + j + 2) as f64 / 2.0;
        rank_sum += order[i..=j].iter().filter(|&&k| labels[k] > 0.5).count() as f64 * average_rank;
        i = j + 1;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_is_scored_on_its_own_outputs() {
        // Two examples; task 0 binary, task 1 over 3 classes: 4 outputs each.
        let probs = [0.9, 0.1, 0.7, 0.2, 0.2, 0.3, 0.3, 0.4];
        let labels = [1.0, 1.0, 0.0, 2.0];
        let [binary, classes] = BinaryMetrics::per_task(&probs, &labels, &[1, 3])[..] else {
            panic!("one set per task");
        };
        // Debug forms: a multi-class calibration is NaN, never equal to itself.
        let same = |a: BinaryMetrics, b: BinaryMetrics| format!("{a:?}") == format!("{b:?}");
        assert!(same(
            binary,
            BinaryMetrics::compute(&[0.9, 0.2], &[1.0, 0.0])
        ));
        let expected = BinaryMetrics::multiclass(&[0.1, 0.7, 0.2, 0.3, 0.3, 0.4], &[1.0, 2.0], 3);
        assert!(same(classes, expected), "{classes:?} vs {expected:?}");
        assert_eq!(classes.accuracy, 1.0, "class 1, then class 2, both on top");
    }

    #[test]
    fn auc_of_perfect_reversed_and_tied_rankings() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        assert_eq!(auc(&[0.5; 4], &[0.0, 1.0, 0.0, 1.0]), 0.5);
        // One inversion out of 2 x 2 pairs.
        assert_eq!(auc(&[0.1, 0.6, 0.5, 0.9], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert!(auc(&[0.1, 0.2], &[1.0, 1.0]).is_nan());
    }

    #[test]
    fn multiclass_metrics_by_hand() {
        // Three examples, three classes: the first two right, the third
        // wrong (class 2 predicted for class 1).
        let probs = [0.7, 0.2, 0.1, 0.1, 0.8, 0.1, 0.2, 0.3, 0.5];
        let m = BinaryMetrics::multiclass(&probs, &[0.0, 1.0, 1.0], 3);
        assert_eq!(m.count, 3);
        assert!((m.accuracy - 2.0 / 3.0).abs() < 1e-12);
        let logloss = -(0.7f64.ln() + 0.8f64.ln() + 0.3f64.ln()) / 3.0;
        assert!((m.logloss - logloss).abs() < 1e-6, "{}", m.logloss);
        // Class 0: 0.7 ranks above both negatives (AUC 1); class 1: 0.8
        // and 0.3 against 0.2 (AUC 1); class 2 never occurs (left out).
        assert_eq!(m.auc, 1.0);
        let swapped = BinaryMetrics::multiclass(&[0.4, 0.6, 0.6, 0.4], &[0.0, 1.0], 2);
        assert_eq!((swapped.accuracy, swapped.auc), (0.0, 0.0));
    }

    #[test]
    fn logloss_and_accuracy_by_hand() {
        let m = BinaryMetrics::compute(&[0.8, 0.4], &[1.0, 1.0]);
        assert!((m.logloss - (-(0.8f64.ln() + 0.4f64.ln()) / 2.0)).abs() < 1e-6);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.count, 2);
        assert!((m.calibration - 0.6).abs() < 1e-6, "1.2 predicted of 2");
        let over = BinaryMetrics::compute(&[0.5, 0.5, 0.5, 0.5], &[1.0, 0.0, 0.0, 0.0]);
        assert!((over.calibration - 2.0).abs() < 1e-6, "2 predicted of 1");
        assert!(BinaryMetrics::compute(&[0.1], &[0.0]).calibration.is_nan());
    }
}
