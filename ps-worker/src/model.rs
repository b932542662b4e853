//! Sparse logistic regression with its weights on the parameter servers.
//!
//! `p = sigmoid(bias + sum_j w[id_j] * x_j)`, loss = mean binary cross-entropy
//! over the batch. The weights live in a sparse table of dim 1, the bias in a
//! dense table of one row; the worker holds nothing between batches.

use ndarray::{Array1, ArrayView1};
use ps_common::PsError;
use ps_common::config::ModelConfig;

use crate::client::PsClient;
use crate::data::Batch;
use crate::dedup::UniqueKeys;

/// The model's parameters for one batch, as pulled from the servers.
#[derive(Debug, Clone)]
pub struct BatchParams {
    /// The batch's distinct feature ids.
    pub unique: UniqueKeys,
    /// One weight per distinct id.
    pub weights: Array1<f32>,
    /// The bias.
    pub bias: f32,
}

/// Gradients of the mean batch loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// One value per distinct id (same order as [`BatchParams::unique`]).
    pub weights: Array1<f32>,
    /// Gradient of the bias.
    pub bias: f32,
}

/// Sparse logistic regression over two server tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogisticRegression {
    weights: String,
    bias: String,
}

impl LogisticRegression {
    /// The model a job configures.
    pub fn from_config(config: &ModelConfig) -> Self {
        match config {
            ModelConfig::Lr { weights, bias } => LogisticRegression {
                weights: weights.clone(),
                bias: bias.clone(),
            },
        }
    }

    /// Pulls the weights of the batch's ids and the bias, in parallel.
    pub async fn pull(&self, client: &PsClient, batch: &Batch) -> Result<BatchParams, PsError> {
        let unique = UniqueKeys::new(&batch.ids);
        let (weights, bias) = tokio::try_join!(
            client.pull_unique(&self.weights, &unique.keys),
            client.pull_unique(&self.bias, &[0]),
        )?;
        Ok(BatchParams {
            unique,
            weights: Array1::from(weights),
            bias: bias.first().copied().unwrap_or(0.0),
        })
    }

    /// Logits of every example.
    pub fn forward(&self, batch: &Batch, params: &BatchParams) -> Array1<f32> {
        let w = params.weights.view();
        Array1::from_iter((0..batch.len()).map(|i| {
            let range = batch.offsets[i]..batch.offsets[i + 1];
            params.bias
                + params.unique.index[range.clone()]
                    .iter()
                    .zip(&batch.values[range])
                    .map(|(&u, &x)| w[u as usize] * x)
                    .sum::<f32>()
        }))
    }

    /// Mean loss and its gradients, given the logits from [`Self::forward`].
    pub fn backward(
        &self,
        batch: &Batch,
        params: &BatchParams,
        logits: ArrayView1<f32>,
    ) -> (f32, Gradients) {
        let labels = ArrayView1::from(&batch.labels);
        let n = batch.len().max(1) as f32;
        let loss = logits
            .iter()
            .zip(labels)
            .map(|(&z, &y)| bce_with_logits(z, y))
            .sum::<f32>()
            / n;
        // d loss / d logit_i = (sigmoid(z_i) - y_i) / n
        let residual = (logits.mapv(sigmoid) - labels) / n;
        let mut weights = Array1::<f32>::zeros(params.weights.len());
        for (i, &r) in residual.iter().enumerate() {
            let range = batch.offsets[i]..batch.offsets[i + 1];
            for (&u, &x) in params.unique.index[range.clone()]
                .iter()
                .zip(&batch.values[range])
            {
                weights[u as usize] += r * x;
            }
        }
        (
            loss,
            Gradients {
                weights,
                bias: residual.sum(),
            },
        )
    }

    /// Pushes gradients asynchronously (see [`PsClient::push_unique`]).
    pub async fn push(
        &self,
        client: &PsClient,
        params: &BatchParams,
        grads: &Gradients,
    ) -> Result<(), PsError> {
        let weights = grads.weights.as_slice().unwrap_or_default();
        client
            .push_unique(&self.weights, &params.unique.keys, weights)
            .await?;
        client.push_unique(&self.bias, &[0], &[grads.bias]).await
    }

    /// Predicted probabilities of every example.
    pub fn predict(&self, batch: &Batch, params: &BatchParams) -> Array1<f32> {
        self.forward(batch, params).mapv(sigmoid)
    }
}

/// The logistic function.
#[inline]
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Binary cross-entropy of logit `z` against label `y`, computed without overflow.
#[inline]
pub fn bce_with_logits(z: f32, y: f32) -> f32 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        // Example 0: ids 1, 2 (x = 1, 0.5); example 1: ids 2, 2, 3 (duplicate id).
        Batch {
            labels: vec![1.0, 0.0],
            offsets: vec![0, 2, 5],
            ids: vec![1, 2, 2, 2, 3],
            values: vec![1.0, 0.5, 1.0, 2.0, -1.0],
        }
    }

    fn params(batch: &Batch, weights: &[f32], bias: f32) -> BatchParams {
        BatchParams {
            unique: UniqueKeys::new(&batch.ids),
            weights: Array1::from(weights.to_vec()),
            bias,
        }
    }

    fn loss(model: &LogisticRegression, batch: &Batch, p: &BatchParams) -> f32 {
        model.backward(batch, p, model.forward(batch, p).view()).0
    }

    #[test]
    fn forward_sums_weighted_features_plus_bias() {
        let model = LogisticRegression::from_config(&ModelConfig::Lr {
            weights: "w".into(),
            bias: "b".into(),
        });
        let b = batch();
        let logits = model.forward(&b, &params(&b, &[0.5, -1.0, 2.0], 0.25));
        // 0.25 + 0.5 * 1 + (-1) * 0.5 = 0.25; 0.25 + (-1) * 1 + (-1) * 2 + 2 * (-1) = -4.75
        assert_eq!(logits.to_vec(), [0.25, -4.75]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let model = LogisticRegression::from_config(&ModelConfig::Lr {
            weights: "w".into(),
            bias: "b".into(),
        });
        let b = batch();
        let w0 = [0.3f32, -0.2, 0.1];
        let p = params(&b, &w0, 0.05);
        let (_, grads) = model.backward(&b, &p, model.forward(&b, &p).view());
        let h = 1e-3f32;
        for k in 0..3 {
            let (mut plus, mut minus) = (w0, w0);
            plus[k] += h;
            minus[k] -= h;
            let numeric = (loss(&model, &b, &params(&b, &plus, 0.05))
                - loss(&model, &b, &params(&b, &minus, 0.05)))
                / (2.0 * h);
            assert!(
                (numeric - grads.weights[k]).abs() < 1e-3,
                "w[{k}]: {numeric} vs {}",
                grads.weights[k]
            );
        }
        let numeric = (loss(&model, &b, &params(&b, &w0, 0.05 + h))
            - loss(&model, &b, &params(&b, &w0, 0.05 - h)))
            / (2.0 * h);
        assert!((numeric - grads.bias).abs() < 1e-3);
    }

    #[test]
    fn bce_is_stable_for_large_logits() {
        assert!((bce_with_logits(100.0, 1.0)).abs() < 1e-6);
        assert!((bce_with_logits(-100.0, 1.0) - 100.0).abs() < 1e-3);
        assert!((bce_with_logits(0.0, 0.0) - std::f32::consts::LN_2).abs() < 1e-6);
    }
}
