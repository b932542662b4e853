use super::*;
use crate::pb;

fn sparse(name: &str) -> TableSpec {
    TableSpec {
        name: name.into(),
        kind: TableKind::Sparse,
        dim: 8,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.01,
        },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 1,
        lifecycle: Default::default(),
    }
}

#[test]
fn specs_round_trip_through_protobuf() {
    let mut dense = sparse("mlp.w0");
    dense.kind = TableKind::Dense {
        rows: 416,
        block_rows: 32,
    };
    dense.optimizer = OptimizerSpec::Ftrl {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.5,
        l2: 0.0,
    };
    for spec in [sparse("emb"), dense] {
        let wire = pb::TableSpec::from(&spec);
        assert_eq!(TableSpec::try_from(wire).unwrap(), spec);
    }
}

#[test]
fn invalid_specs_are_refused_with_the_field_named() {
    type Mutation = Box<dyn Fn(&mut TableSpec)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|s| s.dim = 0), "dim must be in"),
        (Box::new(|s| s.name = "a b".into()), "table name"),
        (Box::new(|s| s.name = String::new()), "table name"),
        (
            Box::new(|s| s.optimizer = OptimizerSpec::sgd(f32::NAN)),
            "optimizer lr must be > 0",
        ),
        (
            Box::new(|s| {
                s.optimizer = OptimizerSpec::Adam {
                    lr: 0.1,
                    beta1: 1.0,
                    beta2: 0.9,
                    eps: 1e-8,
                    l2: 0.0,
                    weight_decay: 0.0,
                }
            }),
            "beta1 must be in [0, 1)",
        ),
        (
            Box::new(|s| {
                s.initializer = InitializerSpec::Uniform {
                    low: 1.0,
                    high: 1.0,
                }
            }),
            "low < high",
        ),
        (
            Box::new(|s| {
                s.initializer = InitializerSpec::Normal {
                    mean: 3e38,
                    std: 1.0,
                }
            }),
            "initializer mean must be within",
        ),
        (
            Box::new(|s| {
                s.initializer = InitializerSpec::Normal {
                    mean: 0.0,
                    std: 1e30,
                }
            }),
            "initializer std must be >= 0 and <=",
        ),
        (
            Box::new(|s| s.initializer = InitializerSpec::Constant { value: -2e6 }),
            "initializer value must be within",
        ),
        (
            Box::new(|s| {
                s.optimizer = OptimizerSpec::Adagrad {
                    lr: 0.1,
                    initial_accumulator: 3e38,
                    eps: 1e-8,
                    l2: 0.0,
                    weight_decay: 0.0,
                }
            }),
            "initial_accumulator must be >= 0 and <=",
        ),
        (
            Box::new(|s| {
                s.optimizer = OptimizerSpec::Ftrl {
                    alpha: 1e-30,
                    beta: 1.0,
                    l1: 0.0,
                    l2: 0.0,
                }
            }),
            "alpha must be >= 1e-12",
        ),
        (
            Box::new(|s| {
                s.kind = TableKind::Dense {
                    rows: 0,
                    block_rows: 1,
                }
            }),
            "rows >= 1",
        ),
    ];
    for (mutate, expected) in cases {
        let mut spec = sparse("t");
        mutate(&mut spec);
        let err = spec.validate().unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn a_wire_spec_without_optimizer_or_with_unknown_kind_is_invalid() {
    let mut wire = pb::TableSpec::from(&sparse("t"));
    wire.optimizer = None;
    assert!(
        TableSpec::try_from(wire)
            .unwrap_err()
            .to_string()
            .contains("optimizer is missing")
    );
    let mut wire = pb::TableSpec::from(&sparse("t"));
    wire.kind = 7;
    assert!(
        TableSpec::try_from(wire)
            .unwrap_err()
            .to_string()
            .contains("kind must be")
    );
}

#[test]
fn first_difference_names_the_field() {
    let a = sparse("t");
    let mut b = a.clone();
    assert_eq!(a.first_difference(&b), None);
    b.dim = 16;
    let (field, was, now) = a.first_difference(&b).unwrap();
    assert_eq!((field, was.as_str(), now.as_str()), ("dim", "8", "16"));
}
