//! What a prediction request's instance may be: a line of the job's data
//! format without its label, or feature ids with their values and fields.

use crate::data::{Batch, LineFormat};

use super::ServeError;

/// One example to predict.
#[derive(Debug, Clone, PartialEq)]
pub enum Instance {
    /// A line of the job's format without its label (`"3:1 17:1"`).
    Line(String),
    /// Feature ids; `values` empty (all 1) or one per id; `fields` empty
    /// (all 0) or one per id.
    Features {
        /// Feature ids.
        ids: Vec<u64>,
        /// Their values.
        values: Vec<f32>,
        /// Their fields.
        fields: Vec<u32>,
    },
}

impl Instance {
    /// An instance from its JSON form: a string (a line), or an object
    /// `{"ids": [...], "values": [...], "fields": [...]}` (values and
    /// fields optional). The error says what is wrong with it.
    pub fn from_json(value: &serde_json::Value) -> Result<Instance, String> {
        use serde_json::Value;
        match value {
            Value::String(line) => Ok(Instance::Line(line.clone())),
            Value::Object(map) => {
                if let Some(key) = map
                    .keys()
                    .find(|k| !matches!(k.as_str(), "ids" | "values" | "fields"))
                {
                    return Err(format!(
                        "unknown key {key:?}: an instance object has \"ids\", \"values\" and \"fields\""
                    ));
                }
                let list = |key: &str| -> Result<&[Value], String> {
                    match map.get(key) {
                        None => Ok(&[]),
                        Some(Value::Array(items)) => Ok(items),
                        Some(other) => Err(format!("\"{key}\" must be an array, got {other}")),
                    }
                };
                if !map.contains_key("ids") {
                    return Err("an instance object needs \"ids\"".into());
                }
                let ids = list("ids")?
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .ok_or_else(|| format!("id {v} is not an unsigned 64-bit integer"))
                    })
                    .collect::<Result<Vec<u64>, String>>()?;
                let values = list("values")?
                    .iter()
                    .map(|v| match v.as_f64() {
                        Some(x) if (x as f32).is_finite() => Ok(x as f32),
                        _ => Err(format!("value {v} is not a finite number")),
                    })
                    .collect::<Result<Vec<f32>, String>>()?;
                let fields = list("fields")?
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|f| u32::try_from(f).ok())
                            .ok_or_else(|| format!("field {v} is not a 32-bit unsigned integer"))
                    })
                    .collect::<Result<Vec<u32>, String>>()?;
                Ok(Instance::Features {
                    ids,
                    values,
                    fields,
                })
            }
            other => Err(format!(
                "an instance is a string (a data line without its label) or an object with \"ids\", got {other}"
            )),
        }
    }
}

/// The batch of `instances`, parsed as `format` reads lines. Fails on the
/// first instance that does not parse, naming it.
pub fn to_batch(instances: &[Instance], format: &LineFormat) -> Result<Batch, ServeError> {
    let mut batch = Batch::new();
    for (i, instance) in instances.iter().enumerate() {
        let bad = |why: String| ServeError::BadRequest(format!("instance {i}: {why}"));
        match instance {
            Instance::Line(line) => {
                if line.contains('\n') {
                    return Err(bad("a line instance holds one example (no newline)".into()));
                }
                format.parse_unlabeled(line, &mut batch).map_err(bad)?;
            }
            Instance::Features {
                ids,
                values,
                fields,
            } => {
                if format.pixels.is_some() {
                    return Err(bad(
                        "the model reads images: send each instance as a line of pixel values"
                            .into(),
                    ));
                }
                if format.numeric.dense {
                    return Err(bad(
                        "the model reads numeric columns as MLP inputs (data.numeric.dense): \
                         send the instance as a line"
                            .into(),
                    ));
                }
                if !values.is_empty() && values.len() != ids.len() {
                    return Err(bad(format!(
                        "{} values for {} ids: give one per id, or none (all 1)",
                        values.len(),
                        ids.len()
                    )));
                }
                if !fields.is_empty() && fields.len() != ids.len() {
                    return Err(bad(format!(
                        "{} fields for {} ids: give one per id, or none (all 0)",
                        fields.len(),
                        ids.len()
                    )));
                }
                if let Some(f) = fields.iter().find(|&&f| f >= format.fields.max(1)) {
                    return Err(bad(format!(
                        "field {f} is not below the job's data.fields = {}",
                        format.fields.max(1)
                    )));
                }
                if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                    return Err(bad(format!("value {v} is not finite")));
                }
                let ones;
                let values = if values.is_empty() {
                    ones = vec![1.0; ids.len()];
                    &ones
                } else {
                    values
                };
                batch.push_features(ids, values, fields, format.labels.tasks());
            }
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_common::config::DataFormat;

    fn libsvm() -> LineFormat {
        LineFormat {
            format: DataFormat::Libsvm,
            fields: 1,
            labels: crate::data::LabelFormat::binary(1),
            numeric: Default::default(),
            csv: None,
            pixels: None,
        }
    }

    #[test]
    fn lines_and_objects_make_the_same_examples() {
        let lines = [Instance::Line("3:1 17:0.5".into())];
        let objects =
            [
                Instance::from_json(&serde_json::json!({"ids": [3, 17], "values": [1.0, 0.5]}))
                    .unwrap(),
            ];
        let a = to_batch(&lines, &libsvm()).unwrap();
        let b = to_batch(&objects, &libsvm()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.labels, vec![0.0]);
    }

    #[test]
    fn a_bad_instance_is_named_and_nothing_is_parsed() {
        let instances = [
            Instance::Line("3:1".into()),
            Instance::Line("1 3:1 x".into()),
        ];
        let err = to_batch(&instances, &libsvm()).unwrap_err();
        let ServeError::BadRequest(message) = err else {
            panic!("{err:?}");
        };
        assert!(message.starts_with("instance 1: "), "{message}");
        for bad in [
            serde_json::json!(7),
            serde_json::json!({"ids": [-1]}),
            serde_json::json!({"ids": [1], "weights": [1]}),
            serde_json::json!({"values": [1.0]}),
        ] {
            assert!(Instance::from_json(&bad).is_err(), "{bad}");
        }
        let mismatched = Instance::Features {
            ids: vec![1, 2],
            values: vec![1.0],
            fields: vec![],
        };
        assert!(to_batch(&[mismatched], &libsvm()).is_err());
        let far_field = Instance::Features {
            ids: vec![1],
            values: vec![],
            fields: vec![1],
        };
        assert!(to_batch(&[far_field], &libsvm()).is_err());
    }
}
