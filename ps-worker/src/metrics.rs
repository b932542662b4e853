//! Binary-classification metrics: logloss, AUC, accuracy, calibration.

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

    /// One set of metrics per task, for example-major `probs` and `labels`
    /// with `tasks` values per example.
    pub fn per_task(probs: &[f32], labels: &[f32], tasks: usize) -> Vec<Self> {
        let tasks = tasks.max(1);
        (0..tasks)
            .map(|t| {
                let column =
                    |v: &[f32]| v.iter().skip(t).step_by(tasks).copied().collect::<Vec<_>>();
                Self::compute(&column(probs), &column(labels))
            })
            .collect()
    }
}

/// One task's validation metrics in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskMetrics {
    /// Task name (`label` for single-task models).
    pub task: String,
    /// ROC AUC.
    pub auc: f64,
    /// Mean logloss.
    pub logloss: f64,
    /// Accuracy at threshold 0.5.
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
    fn auc_of_perfect_reversed_and_tied_rankings() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        assert_eq!(auc(&[0.5; 4], &[0.0, 1.0, 0.0, 1.0]), 0.5);
        // One inversion out of 2 x 2 pairs.
        assert_eq!(auc(&[0.1, 0.6, 0.5, 0.9], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert!(auc(&[0.1, 0.2], &[1.0, 1.0]).is_nan());
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
