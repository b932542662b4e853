use super::*;

const JOB: &str = r#"
[data]
train = "train.libsvm"
validation = "builtin:a9a/test"

[model]
kind = "lr"

[train]
batch_size = 32
epochs = 2

[tables.weights]
kind = "sparse"
dim = 1
initializer = { kind = "zeros" }
optimizer = { kind = "adagrad", lr = 0.05 }

[tables.bias]
kind = "dense"
rows = 1
dim = 1
initializer = { kind = "zeros" }
optimizer = { kind = "sgd", lr = 0.01 }
"#;

#[test]
fn a_complete_job_parses_and_resolves_paths() {
    let job = JobConfig::from_toml(JOB, Path::new("/jobs")).unwrap();
    assert_eq!(
        job.data.train,
        DataSource::File("/jobs/train.libsvm".into())
    );
    assert_eq!(
        job.data.validation,
        Some(DataSource::Builtin("a9a/test".into()))
    );
    assert_eq!(job.train.batch_size, 32);
    assert_eq!(job.train.max_pushes_in_flight, 4, "defaults fill the rest");
    let specs = job.table_specs();
    assert_eq!(specs.len(), 2);
    let bias = specs.iter().find(|s| s.name == "bias").unwrap();
    assert_eq!(
        bias.kind,
        TableKind::Dense {
            rows: 1,
            block_rows: 1
        }
    );
    if let OptimizerSpec::Adagrad {
        initial_accumulator,
        ..
    } = specs
        .iter()
        .find(|s| s.name == "weights")
        .unwrap()
        .optimizer
    {
        assert_eq!(
            initial_accumulator, 0.0,
            "Adagrad's accumulator starts at 0"
        );
    } else {
        panic!("weights should use adagrad");
    }
}

fn error_of(src: &str) -> ConfigError {
    JobConfig::from_toml(src, Path::new(".")).unwrap_err()
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let err = error_of(&JOB.replace("epochs = 2", "epochs = 2\nepocs = 3"));
    assert_eq!(err.line, Some(12), "{err}");
    assert_eq!(err.key.as_deref(), Some("train.epocs"), "{err}");
    assert!(err.to_string().contains("unknown field `epocs`"), "{err}");
}

#[test]
fn a_wrong_type_is_named_with_its_line() {
    let err = error_of(&JOB.replace("batch_size = 32", "batch_size = \"big\""));
    assert_eq!(err.line, Some(10), "{err}");
    assert_eq!(err.key.as_deref(), Some("train.batch_size"), "{err}");
    // Inside an inline `{ kind = ... }` table the error points at the table.
    let err = error_of(&JOB.replace("lr = 0.05", "lr = \"fast\""));
    assert_eq!(
        err.key.as_deref(),
        Some("tables.weights.optimizer"),
        "{err}"
    );
    assert_eq!(err.line, Some(17), "{err}");
}

#[test]
fn an_invalid_value_names_the_key_and_line() {
    let err = error_of(&JOB.replace("lr = 0.05", "lr = -1.0"));
    assert_eq!(err.key.as_deref(), Some("tables.weights.optimizer"));
    assert_eq!(err.line, Some(17), "{err}");
    assert!(err.to_string().contains("lr must be > 0"), "{err}");

    let err = error_of(&JOB.replace("batch_size = 32", "batch_size = 0"));
    assert_eq!(err.key.as_deref(), Some("train.batch_size"));
    assert_eq!(err.line, Some(10));
}

#[test]
fn l2_and_weight_decay_are_table_keys_checked_with_their_line() {
    let job = JobConfig::from_toml(
        &JOB.replace("lr = 0.05 }", "lr = 0.05, l2 = 1e-4, weight_decay = 0.01 }"),
        Path::new("."),
    )
    .unwrap();
    let weights = job.table_specs().into_iter().find(|s| s.name == "weights");
    assert_eq!(
        weights.unwrap().optimizer.regularization(),
        (1e-4, 0.01),
        "both reach the table's spec"
    );
    let err = error_of(&JOB.replace("lr = 0.05 }", "lr = 0.05, l2 = -1.0 }"));
    assert_eq!(err.line, Some(17), "{err}");
    assert!(
        err.to_string().contains("optimizer l2 must be >= 0"),
        "{err}"
    );
    let err = error_of(&JOB.replace("lr = 0.05 }", "lr = 0.05, weight_decay = 30.0 }"));
    assert!(
        err.to_string().contains("lr x weight_decay must be <= 1"),
        "{err}"
    );
    let err = error_of(&JOB.replace("lr = 0.01 }", "lr = 0.01, l1 = 0.1 }"));
    assert!(err.to_string().contains("unknown field `l1`"), "{err}");
}

#[test]
fn a_model_whose_table_is_missing_or_misshapen_is_refused() {
    let err = error_of(&JOB.replace("kind = \"lr\"", "kind = \"lr\"\nweights = \"w\""));
    assert_eq!(err.key.as_deref(), Some("model.weights"));
    assert_eq!(err.line, Some(8));
    let err = error_of(&JOB.replace(
        "dim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\"",
        "dim = 4\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\"",
    ));
    assert_eq!(err.key.as_deref(), Some("tables.weights"));
    assert!(err.message.contains("sparse table with dim = 1"));
}

#[test]
fn lr_schedules_warm_up_then_decay() {
    let constant = LrSchedule::Constant { warmup_steps: 4 };
    assert_eq!(
        [0, 1, 3, 4, 100].map(|s| constant.scale(s)),
        [0.25, 0.5, 1.0, 1.0, 1.0]
    );
    let step = LrSchedule::Step {
        warmup_steps: 0,
        every: 10,
        gamma: 0.5,
    };
    assert_eq!([0, 9, 10, 25].map(|s| step.scale(s)), [1.0, 1.0, 0.5, 0.25]);
    let cosine = LrSchedule::Cosine {
        warmup_steps: 2,
        decay_steps: 100,
        min_scale: 0.1,
    };
    assert_eq!(cosine.scale(2), 1.0);
    assert!((cosine.scale(52) - 0.55).abs() < 1e-6);
    assert!((cosine.scale(102) - 0.1).abs() < 1e-6);
    assert!((cosine.scale(10_000) - 0.1).abs() < 1e-6);
    assert_eq!(constant.push_scale(0), Some(0.25), "warm-up is sent");
    let plain = LrSchedule::Constant { warmup_steps: 0 };
    assert_eq!(plain.push_scale(7), None, "the constant 1 is not sent");
    let err = error_of(&JOB.replace(
        "epochs = 2",
        "epochs = 2\nlr_schedule = { kind = \"step\", every = 0, gamma = 0.5 }",
    ));
    assert_eq!(err.key.as_deref(), Some("train.lr_schedule"), "{err}");
}

#[test]
fn malformed_toml_reports_the_line() {
    let err = error_of("[data]\ntrain = \n");
    assert_eq!(err.line, Some(2), "{err}");
}

#[test]
fn the_row_cache_is_bounded_by_what_the_consistency_model_allows() {
    let with = |train: &str, cache: &str| {
        JOB.replace("epochs = 2", &format!("epochs = 2\n{train}"))
            + &format!("\n[communication]\n{cache}\n")
    };
    let ok = JobConfig::from_toml(&with("", "row_cache_steps = 4"), Path::new(".")).unwrap();
    assert_eq!(ok.communication.row_cache_steps, 4, "async takes any bound");
    assert_eq!(ok.communication.row_cache_rows, None);
    JobConfig::from_toml(
        &with(
            "consistency = \"ssp\"\nstaleness = 2",
            "row_cache_steps = 2",
        ),
        Path::new("."),
    )
    .unwrap();
    for (train, cache, says) in [
        (
            "consistency = \"ssp\"\nstaleness = 2",
            "row_cache_steps = 3",
            "at most train.staleness (2)",
        ),
        (
            "consistency = \"bsp\"",
            "row_cache_steps = 1",
            "bulk-synchronous",
        ),
        (
            "consistency = \"ssp\"\nstaleness = 0",
            "row_cache_steps = 1",
            "bulk-synchronous",
        ),
        ("", "row_cache_steps = 5000", "at most 1024"),
        (
            "",
            "row_cache_steps = 1\nrow_cache_rows = 0",
            "between 1 and",
        ),
    ] {
        let err = error_of(&with(train, cache));
        assert!(
            err.key.as_deref().unwrap_or("").contains("row_cache"),
            "{err}"
        );
        assert!(err.to_string().contains(says), "{err}");
    }
}

#[test]
fn a_sparse_table_takes_admission_and_eviction_and_a_dense_one_refuses_them() {
    use crate::lifecycle::{Admission, EvictionPolicy};
    let lifecycle = "optimizer = { kind = \"adagrad\", lr = 0.05 }\nlifecycle = { admission = { kind = \"count\", min_count = 3 }, eviction = { ttl_pushes = 1000, max_rows = 50000, policy = \"lfu\" } }";
    let job = JobConfig::from_toml(
        &JOB.replace("optimizer = { kind = \"adagrad\", lr = 0.05 }", lifecycle),
        Path::new("."),
    )
    .unwrap();
    let spec = job
        .table_specs()
        .into_iter()
        .find(|s| s.name == "weights")
        .unwrap();
    assert_eq!(
        spec.lifecycle.admission,
        Some(Admission::Count {
            min_count: 3,
            sketch_width: crate::lifecycle::DEFAULT_SKETCH_WIDTH
        })
    );
    let eviction = spec.lifecycle.eviction.unwrap();
    assert_eq!(
        (eviction.ttl_pushes, eviction.max_rows, eviction.policy),
        (Some(1000), Some(50000), EvictionPolicy::Lfu)
    );

    let err = error_of(&JOB.replace(
        "optimizer = { kind = \"sgd\", lr = 0.01 }",
        "optimizer = { kind = \"sgd\", lr = 0.01 }\nlifecycle = { eviction = { max_rows = 5 } }",
    ));
    assert_eq!(err.key.as_deref(), Some("tables.bias.lifecycle"), "{err}");
    assert!(err.message.contains("sparse tables only"), "{err}");

    let err = error_of(&JOB.replace(
        "optimizer = { kind = \"adagrad\", lr = 0.05 }",
        "optimizer = { kind = \"adagrad\", lr = 0.05 }\nlifecycle = { eviction = { max_rows = 0 } }",
    ));
    assert_eq!(
        err.key.as_deref(),
        Some("tables.weights.lifecycle"),
        "{err}"
    );
    assert!(err.message.contains("max_rows must be >= 1"), "{err}");
}

#[test]
fn csv_columns_and_numeric_options_are_checked_with_their_key() {
    let csv = |data: &str| {
        JOB.replace(
            "train = \"train.libsvm\"",
            &format!("train = \"train.csv\"\nformat = \"csv\"\n{data}"),
        )
    };
    let good =
        "fields = 3\ncsv = { label = \"y\", numeric = [\"a\", \"b\"], categorical = [\"c\"] }";
    let job = JobConfig::from_toml(&csv(good), Path::new(".")).unwrap();
    assert_eq!(job.data.csv.as_ref().map(CsvConfig::fields), Some(3));
    assert_eq!(job.data.csv.unwrap().delimiter, ',');
    for (data, key, message) in [
        ("", "data.csv", "needs [data.csv]"),
        (
            "fields = 2\ncsv = { label = \"y\", numeric = [\"a\", \"b\"], categorical = [\"c\"] }",
            "data.fields",
            "set fields = 3",
        ),
        (
            "fields = 1\ncsv = { label = [\"y\", \"z\"], numeric = [\"a\"] }",
            "data.csv.label",
            "2 label column(s) for a model of 1 task(s)",
        ),
        (
            "fields = 2\ncsv = { label = \"y\", numeric = [\"a\"], categorical = [\"y\"] }",
            "data.csv",
            "column \"y\" has two roles",
        ),
        (
            "fields = 1\ncsv = { label = \"y\", numeric = [\"a\"], delimiter = \"\\\"\" }",
            "data.csv.delimiter",
            "one ASCII character",
        ),
        (
            "fields = 1\ncsv = { label = \"y\" }",
            "data.csv",
            "at least one numeric",
        ),
        (
            "fields = 1\ncsv = { label = \"y\", numeric = [\"a\"] }\nnumeric = { clip = [0.0, 1.0] }",
            "data.numeric",
            "set data.integers",
        ),
        (
            "fields = 1\nintegers = \"value\"\ncsv = { label = \"y\", numeric = [\"a\"] }\nnumeric = { clip = [2.0, 1.0] }",
            "data.numeric.clip",
            "finite low < high",
        ),
        (
            "fields = 1\nintegers = \"log\"\ncsv = { label = \"y\", numeric = [\"a\"] }\nnumeric = { normalize = \"min_max\" }",
            "data.numeric.normalize",
            "set clip",
        ),
        (
            "fields = 2\ncsv = { label = \"y\", numeric = [\"a\"], categorical = [\"c\"] }\n\
             sample_by_feature = [{ field = 0, value = \"x\", rate = 0.5 }]",
            "data.sample_by_feature[0]",
            "csv samples by a categorical column: field 1-1",
        ),
    ] {
        let err = error_of(&csv(data));
        assert_eq!(err.key.as_deref(), Some(key), "{data}: {err}");
        assert!(err.message.contains(message), "{data}: {err}");
    }
    let dense = "fields = 1\nintegers = \"log\"\nnumeric = { dense = true }\n\
                 csv = { label = \"y\", numeric = [\"a\"] }";
    let err = error_of(&csv(dense));
    assert_eq!(err.key.as_deref(), Some("data.numeric.dense"), "{err}");
    assert!(err.message.contains("feeds an MLP"), "{err}");
    let err = error_of(&JOB.replace(
        "validation =",
        "csv = { label = \"y\", numeric = [\"a\"] }\nvalidation =",
    ));
    assert!(err.message.contains("is for format = \"csv\""), "{err}");
}

const IMAGES: &str = r#"
[data]
format = "pixels"
train = "builtin:digits/train"
image = { height = 8, width = 8, scale = 16.0 }
augment = { shift = 1 }

[model]
kind = "resnet"
classes = 10
stages = [8, 16]
optimizer = { kind = "adam", lr = 0.003 }
"#;

#[test]
fn an_image_job_needs_no_tables_and_generates_its_layers() {
    let job = JobConfig::from_toml(IMAGES, Path::new(".")).unwrap();
    assert_eq!(job.model.classes(), 10);
    let image = job.data.image.unwrap();
    assert_eq!((image.pixels(), image.channels), (64, 1));
    let names: Vec<String> = job.table_specs().into_iter().map(|s| s.name).collect();
    assert_eq!(names[0], "resnet.stem.w");
    assert!(names.contains(&"resnet.s1b0.proj.bn_stats".to_string()));
    assert_eq!(names.last().map(String::as_str), Some("resnet.out.b"));
    let inception = IMAGES.replace(
        "kind = \"resnet\"\nclasses = 10\nstages = [8, 16]",
        "kind = \"inception\"\nclasses = 10\nmodules = [{ b1 = 4, b3_reduce = 4, b3 = 8, b5_reduce = 2, b5 = 4, pool = 4 }]",
    );
    let job = JobConfig::from_toml(&inception, Path::new(".")).unwrap();
    let specs = job.table_specs();
    let out = specs.iter().find(|s| s.name == "inception.out.w").unwrap();
    assert_eq!((out.kind.rows(), out.dim), (Some(20), 10));
}

#[test]
fn image_settings_that_cannot_work_are_named() {
    for (from, to, key, message) in [
        (
            "format = \"pixels\"",
            "format = \"libsvm\"",
            "data.image",
            "is for format = \"pixels\"",
        ),
        (
            "image = { height = 8, width = 8, scale = 16.0 }\naugment = { shift = 1 }",
            "",
            "data.image",
            "needs [data.image]",
        ),
        ("height = 8,", "height = 0,", "data.image", "must be >= 1"),
        (
            "height = 8,",
            "height = 200000,",
            "data.image",
            "at most 1048576 values",
        ),
        ("scale = 16.0", "scale = 0.0", "data.image.scale", "> 0"),
        (
            "shift = 1",
            "shift = 8",
            "data.augment.shift",
            "smaller than the image",
        ),
        (
            "shift = 1",
            "noise = -1.0",
            "data.augment.noise",
            "finite and >= 0",
        ),
        ("classes = 10", "classes = 1", "model.classes", "between 2"),
        (
            "stages = [8, 16]",
            "stages = []",
            "model.stages",
            "at least one",
        ),
        (
            "stages = [8, 16]",
            "stages = [8, 0]",
            "model.stages",
            "between 1 and 2048 channels, got 0",
        ),
        (
            "stages = [8, 16]",
            "stages = [8, 16]\nblocks = 0",
            "model.blocks",
            "between 1 and 64",
        ),
        (
            "stages = [8, 16]",
            "stages = [8, 16]\nname = \"a b\"",
            "model.name",
            "[A-Za-z0-9_.-]",
        ),
        (
            "kind = \"resnet\"\nclasses = 10\nstages = [8, 16]\noptimizer = { kind = \"adam\", lr = 0.003 }",
            "kind = \"lr\"\n[tables.weights]\nkind = \"sparse\"\ndim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"sgd\", lr = 0.1 }\n[tables.bias]\nkind = \"dense\"\nrows = 1\ndim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"sgd\", lr = 0.1 }",
            "model.kind",
            "feeds the image models",
        ),
    ] {
        let src = IMAGES.replace(from, to);
        assert_ne!(src, IMAGES, "{from:?} is in the job");
        let err = error_of(&src);
        assert_eq!(err.key.as_deref(), Some(key), "{from} -> {to}: {err}");
        assert!(err.to_string().contains(message), "{from} -> {to}: {err}");
    }
    // An image model on data that is not images.
    let err = error_of(&IMAGES.replace(
        "format = \"pixels\"\ntrain = \"builtin:digits/train\"\nimage = { height = 8, width = 8, scale = 16.0 }\naugment = { shift = 1 }",
        "train = \"builtin:a9a/train\"",
    ));
    assert_eq!(err.key.as_deref(), Some("data.format"), "{err}");
    assert!(
        err.to_string().contains("the resnet model reads images"),
        "{err}"
    );
}

const TASKS: &str = r#"
[data]
format = "libffm"
fields = 4
train = "train.ffm"

[model]
kind = "multitask"
tasks = [{ name = "a" }, { name = "b" }]
shared = { hidden = [8], optimizer = { kind = "adam", lr = 0.003 } }
tower = { hidden = [4], optimizer = { kind = "adam", lr = 0.003 } }
task_embedding = { dim = 4 }
cross_attention = { heads = 2, dim = 8 }

[tables.embeddings]
kind = "sparse"
dim = 4
initializer = { kind = "normal", std = 0.1 }
optimizer = { kind = "adagrad", lr = 0.02 }
"#;

#[test]
fn task_embeddings_and_cross_attention_generate_their_tables() {
    let job = JobConfig::from_toml(TASKS, Path::new(".")).unwrap();
    let specs = job.table_specs();
    let spec = |name: &str| specs.iter().find(|s| s.name == name).unwrap();
    // The shared bottom reads 4 fields x 4 values and the task vector.
    assert_eq!(spec("mlp.0.w").kind.rows(), Some(16 + 4));
    assert_eq!(
        (spec("mlp.task_emb").kind.rows(), spec("mlp.task_emb").dim),
        (Some(2), 4)
    );
    // A token is made from the tower's last hidden layer (4 values).
    assert_eq!(
        (spec("mlp.b.enc.w").kind.rows(), spec("mlp.b.enc.w").dim),
        (Some(4), 8)
    );
    assert_eq!(spec("mlp.attn.o").dim, 8);
    // Each tower reads the shared bottom's 8 values; its output layer
    // reads its last hidden layer (4) beside what it gathered (8).
    assert_eq!(spec("mlp.a.0.w").kind.rows(), Some(8));
    assert_eq!(
        (spec("mlp.a.out.w").kind.rows(), spec("mlp.a.out.w").dim),
        (Some(4 + 8), 1)
    );
}

#[test]
fn a_task_with_classes_has_a_softmax_head_of_that_width() {
    let src = TASKS.replace("{ name = \"b\" }", "{ name = \"b\", classes = 5 }");
    let job = JobConfig::from_toml(&src, Path::new(".")).unwrap();
    assert_eq!(job.model.task_classes(), [1, 5]);
    assert_eq!(job.model.classes(), 1, "no single softmax over the model");
    let specs = job.table_specs();
    let dim = |name: &str| specs.iter().find(|s| s.name == name).unwrap().dim;
    assert_eq!((dim("mlp.a.out.w"), dim("mlp.a.bias")), (1, 1));
    assert_eq!((dim("mlp.b.out.w"), dim("mlp.b.bias")), (5, 5));
    let sampled = src.replace(
        "train = \"train.ffm\"",
        "train = \"train.ffm\"\nnegative_sampling = 0.5",
    );
    let err = error_of(&sampled);
    assert_eq!(err.key.as_deref(), Some("data.negative_sampling"), "{err}");
}

#[test]
fn task_sharing_settings_that_cannot_work_are_named() {
    for (from, to, key, message) in [
        (
            "heads = 2, dim = 8",
            "heads = 3, dim = 8",
            "model.cross_attention.heads",
            "divide dim = 8",
        ),
        (
            "heads = 2, dim = 8",
            "heads = 0, dim = 8",
            "model.cross_attention.heads",
            ">= 1",
        ),
        (
            "heads = 2, dim = 8",
            "heads = 1, dim = 0",
            "model.cross_attention.dim",
            "between 1 and 1024",
        ),
        (
            "tasks = [{ name = \"a\" }, { name = \"b\" }]",
            "tasks = [{ name = \"a\" }]",
            "model.cross_attention",
            "at least two tasks",
        ),
        (
            "task_embedding = { dim = 4 }",
            "task_embedding = { dim = 0 }",
            "model.task_embedding.dim",
            "between 1",
        ),
        (
            "shared = { hidden = [8], optimizer = { kind = \"adam\", lr = 0.003 } }",
            "",
            "model.task_embedding",
            "feeds the shared bottom",
        ),
        (
            "{ name = \"b\" }",
            "{ name = \"b\", classes = 1 }",
            "model.tasks[1].classes",
            "between 2 and 65536",
        ),
        (
            "tower = { hidden = [4]",
            "tower = { hidden = []",
            "model.tower.hidden",
            "at least one hidden layer",
        ),
    ] {
        let src = TASKS.replace(from, to);
        assert_ne!(src, TASKS, "{from:?} is in the job");
        let err = error_of(&src);
        assert_eq!(err.key.as_deref(), Some(key), "{from} -> {to}: {err}");
        assert!(err.to_string().contains(message), "{from} -> {to}: {err}");
    }
}

/// A Wide&Deep model over 5 classes: the wide part and the bias hold a
/// value per class, and so does the MLP's output layer.
const CLASSES: &str = r#"
[data]
train = "train.libsvm"
fields = 1

[model]
kind = "wide_deep"
classes = 5
mlp = { hidden = [8], optimizer = { kind = "adam", lr = 0.003 } }

[tables.weights]
kind = "sparse"
dim = 5
initializer = { kind = "zeros" }
optimizer = { kind = "adagrad", lr = 0.05 }

[tables.bias]
kind = "dense"
rows = 1
dim = 5
initializer = { kind = "zeros" }
optimizer = { kind = "adagrad", lr = 0.05 }

[tables.embeddings]
kind = "sparse"
dim = 4
initializer = { kind = "normal", std = 0.1 }
optimizer = { kind = "adagrad", lr = 0.02 }
"#;

#[test]
fn a_multiclass_model_holds_a_value_per_class_in_its_output_tables() {
    let job = JobConfig::from_toml(CLASSES, Path::new(".")).unwrap();
    assert_eq!(job.model.classes(), 5);
    let specs = job.table_specs();
    let out = specs.iter().find(|s| s.name == "mlp.out.w").unwrap();
    assert_eq!((out.kind.rows(), out.dim), (Some(8), 5));
    let binary = JobConfig::from_toml(JOB, Path::new(".")).unwrap();
    assert_eq!(binary.model.classes(), 1, "no classes: binary");
}

#[test]
fn a_multiclass_fm_weighs_the_factor_dimensions_per_class() {
    let fm = |src: &str| {
        src.replace("kind = \"wide_deep\"", "kind = \"fm\"")
            .replace(
                "mlp = { hidden = [8], optimizer = { kind = \"adam\", lr = 0.003 } }\n",
                "",
            )
    };
    for src in [
        fm(CLASSES),
        CLASSES.replace("kind = \"wide_deep\"", "kind = \"deepfm\""),
    ] {
        let kind = src
            .lines()
            .find(|l| l.starts_with("kind"))
            .unwrap_or_default()
            .to_string();
        let job = JobConfig::from_toml(&src, Path::new(".")).unwrap();
        let specs = job.table_specs();
        let weights = specs.iter().find(|s| s.name == "embeddings.classes");
        let weights = weights.unwrap_or_else(|| panic!("{kind}: no embeddings.classes"));
        assert_eq!((weights.kind.rows(), weights.dim), (Some(4), 5), "k x C");
        let embeddings = specs.iter().find(|s| s.name == "embeddings").unwrap();
        assert_eq!(weights.optimizer, embeddings.optimizer, "{kind}");
    }
    let binary = fm(CLASSES)
        .replace("classes = 5\n", "")
        .replace("dim = 5", "dim = 1");
    let job = JobConfig::from_toml(&binary, Path::new(".")).unwrap();
    assert!(
        job.table_specs()
            .iter()
            .all(|s| s.name != "embeddings.classes"),
        "a binary FM has one summed term"
    );
}

#[test]
fn multiclass_settings_that_cannot_work_are_named() {
    for (from, to, key, message) in [
        (
            "classes = 5",
            "classes = 1",
            "model.classes",
            "between 2 and 65536",
        ),
        (
            "dim = 5\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\", lr = 0.05 }\n\n[tables.bias]",
            "dim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\", lr = 0.05 }\n\n[tables.bias]",
            "tables.weights",
            "dim = 5 (one value per class: model.classes = 5)",
        ),
        (
            "rows = 1\ndim = 5",
            "rows = 1\ndim = 1",
            "tables.bias",
            "rows = 1 and dim = 5",
        ),
        (
            "kind = \"wide_deep\"\nclasses = 5\nmlp = { hidden = [8], optimizer = { kind = \"adam\", lr = 0.003 } }\n",
            "kind = \"deepfm\"\nclasses = 5\nmlp = { hidden = [8], optimizer = { kind = \"adam\", lr = 0.003 } }\n\n\
             [tables.\"embeddings.classes\"]\nkind = \"sparse\"\ndim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"sgd\", lr = 0.1 }\n",
            "model",
            "both named 'embeddings.classes'",
        ),
        (
            "train = \"train.libsvm\"",
            "train = \"train.libsvm\"\nnegative_sampling = 0.5",
            "data.negative_sampling",
            "needs a binary model",
        ),
        (
            "train = \"train.libsvm\"\nfields = 1",
            "format = \"criteo\"\ntrain = \"day_0\"\nfields = 39",
            "model.classes",
            "criteo's label is a click",
        ),
    ] {
        let src = CLASSES.replace(from, to);
        assert_ne!(src, CLASSES, "{from:?} is in the job");
        let err = error_of(&src);
        assert_eq!(err.key.as_deref(), Some(key), "{from} -> {to}: {err}");
        assert!(err.to_string().contains(message), "{from} -> {to}: {err}");
    }
}
