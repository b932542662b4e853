//! The checks of `[model]` against `[tables]`: each table a model reads
//! exists with the kind, dim and shape the model needs, and the MLPs'
//! settings hold.

use super::*;

impl ModelConfig {
    /// Checks that the tables the model reads exist with the shape it needs.
    pub(super) fn validate(
        &self,
        tables: &BTreeMap<String, TableConfig>,
    ) -> Result<(), (String, String)> {
        let model = self.kind_name();
        self.validate_conv_net()?;
        if let Some(classes) = self.declared_classes() {
            super::convnet::validate_classes(classes)?;
        }
        // The linear part and the bias hold one value per output.
        let outputs = self.classes();
        let get = |field: &str, name: &str| {
            tables.get(name).ok_or_else(|| {
                (
                    format!("model.{field}"),
                    format!("table '{name}' is not defined under [tables]"),
                )
            })
        };
        if let Some(weights) = self.weights_table() {
            let w = get("weights", weights)?;
            if w.kind != TableKindConfig::Sparse || w.dim != outputs {
                return Err((
                    format!("tables.{weights}"),
                    format!(
                        "the {model} model needs a sparse table with dim = {outputs}{}",
                        per_class(outputs)
                    ),
                ));
            }
        }
        if let Some(bias) = self.bias_table() {
            let b = get("bias", bias)?;
            if b.kind != TableKindConfig::Dense || b.dim != outputs || b.rows != Some(1) {
                return Err((
                    format!("tables.{bias}"),
                    format!(
                        "the {model} model needs a dense table with rows = 1 and dim = {outputs}{}",
                        per_class(outputs)
                    ),
                ));
            }
        }
        if let ModelConfig::Multitask {
            tasks,
            shared,
            experts,
            tower,
            task_embedding,
            cross_attention,
            ..
        } = self
        {
            multitask::validate(
                task_embedding.as_ref(),
                cross_attention.as_ref(),
                shared.is_some(),
                tower,
                tasks.len(),
            )?;
            for (t, task) in tasks.iter().enumerate() {
                if let Some(classes) = task.classes {
                    super::convnet::validate_classes(classes)
                        .map_err(|(_, why)| (format!("model.tasks[{t}].classes"), why))?;
                }
            }
            if let Some(experts) = experts {
                if shared.is_some() {
                    return Err((
                        "model.experts".into(),
                        "experts (MMoE) replace the shared bottom: set one of shared and experts"
                            .into(),
                    ));
                }
                if experts.count == 0 {
                    return Err(("model.experts.count".into(), "must be >= 1".into()));
                }
                if experts.mlp.hidden.is_empty() {
                    return Err((
                        "model.experts.mlp.hidden".into(),
                        "an expert needs at least one layer".into(),
                    ));
                }
            }
            if tasks.is_empty() {
                return Err(("model.tasks".into(), "needs at least one task".into()));
            }
            for (i, task) in tasks.iter().enumerate() {
                crate::names::validate_table_name(&task.name).map_err(|_| {
                    (
                        "model.tasks".into(),
                        format!(
                            "task {i}: name {} must be 1-128 characters from [A-Za-z0-9_.-]",
                            crate::names::quoted(&task.name)
                        ),
                    )
                })?;
                if !(task.weight.is_finite() && task.weight >= 0.0) {
                    return Err((
                        "model.tasks".into(),
                        format!("task {:?}: weight must be finite and >= 0", task.name),
                    ));
                }
                if tasks[..i].iter().any(|t| t.name == task.name) {
                    return Err((
                        "model.tasks".into(),
                        format!("task {:?} appears twice", task.name),
                    ));
                }
            }
            if shared.as_ref().is_some_and(|s| s.hidden.is_empty()) {
                return Err((
                    "model.shared.hidden".into(),
                    "a shared bottom needs at least one layer".into(),
                ));
            }
        }
        if let Some(name) = self.embeddings_table() {
            let e = get("embeddings", name)?;
            if e.kind != TableKindConfig::Sparse {
                return Err((
                    format!("tables.{name}"),
                    format!("the {model} model needs a sparse embeddings table"),
                ));
            }
        }
        for (key, mlp) in self.mlps() {
            let at = |field: &str| format!("model.{key}.{field}");
            if mlp.hidden.contains(&0) {
                return Err((at("hidden"), "every layer needs a width >= 1".into()));
            }
            if mlp.hidden.is_empty()
                && matches!(
                    self,
                    ModelConfig::Deepfm { .. } | ModelConfig::WideDeep { .. }
                )
            {
                return Err((
                    at("hidden"),
                    format!("the {model} model needs at least one hidden layer"),
                ));
            }
            if let Some(init) = &mlp.initializer {
                init.validate().map_err(|e| (at("initializer"), e))?;
            }
            if !(0.0..1.0).contains(&mlp.dropout) {
                return Err((at("dropout"), "must be in [0, 1)".into()));
            }
            if !(0.0..1.0).contains(&mlp.bn_momentum) {
                return Err((at("bn_momentum"), "must be in [0, 1)".into()));
            }
            if mlp.name.is_empty() {
                return Err((at("name"), "must not be empty".into()));
            }
            mlp.optimizer
                .validate()
                .map_err(|e| (at("optimizer"), e.to_string()))?;
            if let Some(clash) = tables
                .keys()
                .find(|t| t.starts_with(&format!("{}.", mlp.name)))
            {
                return Err((
                    format!("tables.{clash}"),
                    format!(
                        "names starting with '{}.' are reserved for the MLP's generated tables",
                        mlp.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How a table's dim follows from `classes` in an error message.
fn per_class(outputs: u32) -> String {
    if outputs > 1 {
        format!(" (one value per class: model.classes = {outputs})")
    } else {
        String::new()
    }
}
