//! The gRPC twin of the REST endpoint: `ps.v1.Predictor/Predict`.

use std::time::Instant;

use ps_common::pb::{self, predictor_server};
use tonic::{Request, Response, Status};

use super::{Instance, Predictor, ServeError};

/// The `Predictor` service over a served model.
#[derive(Debug, Clone)]
pub struct PredictorService {
    predictor: Predictor,
}

impl PredictorService {
    /// Serves `predictor`.
    pub fn new(predictor: Predictor) -> PredictorService {
        PredictorService { predictor }
    }
}

fn status(e: &ServeError) -> Status {
    match e {
        ServeError::BadRequest(m) => Status::invalid_argument(m.clone()),
        ServeError::Overloaded(m) => Status::resource_exhausted(m.clone()),
        ServeError::Rows(_) => Status::unavailable(e.to_string()),
        ServeError::Internal(_) => Status::internal(e.to_string()),
        ServeError::Unauthenticated(m) => Status::unauthenticated(m.clone()),
    }
}

impl From<pb::Instance> for Instance {
    fn from(instance: pb::Instance) -> Instance {
        match instance.features {
            Some(pb::instance::Features::Line(line)) => Instance::Line(line),
            Some(pb::instance::Features::List(list)) => Instance::Features {
                ids: list.ids,
                values: list.values,
                fields: list.fields,
            },
            None => Instance::Features {
                ids: Vec::new(),
                values: Vec::new(),
                fields: Vec::new(),
            },
        }
    }
}

#[tonic::async_trait]
impl predictor_server::Predictor for PredictorService {
    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let started = Instant::now();
        let token = request
            .metadata()
            .get(ps_common::auth::HEADER)
            .map(|v| v.as_bytes().to_vec());
        if let Err(e) = self.predictor.check_token(token.as_deref()) {
            self.predictor.metrics().refused(e.kind());
            return Err(status(&e));
        }
        let request = request.into_inner();
        let instances: Vec<Instance> = request.instances.into_iter().map(Into::into).collect();
        let answer = self.predictor.predict(&request.model, &instances).await;
        let seconds = started.elapsed().as_secs_f64();
        let metrics = self.predictor.metrics();
        match answer {
            Ok(predictions) => {
                metrics.request("grpc", seconds, None);
                Ok(Response::new(pb::PredictResponse {
                    predictions: predictions
                        .into_iter()
                        .map(|probabilities| pb::Prediction { probabilities })
                        .collect(),
                }))
            }
            Err(e) => {
                metrics.request("grpc", seconds, Some(e.kind()));
                Err(status(&e))
            }
        }
    }
}
