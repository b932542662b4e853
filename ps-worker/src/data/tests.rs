//! The readers' specifications: examples, a bounded fuzz harness, and
//! properties of the line parsers over generated lines.

/// A CSV layout for the fuzzers: label, one numeric column (values
/// clipped), one categorical.
fn csv_layout() -> super::CsvLayout {
    let config = ps_common::config::CsvConfig {
        delimiter: ',',
        label: ps_common::config::Labels::One("y".into()),
        numeric: vec!["a".into()],
        categorical: vec!["c".into()],
    };
    super::CsvLayout::from_header("y,a,c", &config).expect("the header names every column")
}

fn csv_numeric() -> super::Numeric {
    super::Numeric {
        mode: ps_common::config::IntegerFeatures::Value,
        clip: Some([-1.0, 1.0]),
        min_max: true,
        dense: false,
    }
}

mod examples {
    use super::super::parse::*;
    use super::super::*;
    use super::{csv_layout, csv_numeric};
    use ps_common::config::IntegerFeatures;
    use std::io::Write;

    #[test]
    fn appended_batches_keep_their_examples_labels_and_fields_in_order() {
        let mut fielded = Batch::new();
        fielded.push_features(&[7, 8], &[1.0, 0.5], &[2, 3], 2);
        let mut plain = Batch::new();
        parse_libsvm_line("1,0 5:1 6:2", &LabelFormat::binary(2), &mut plain).unwrap();
        let mut merged = Batch::new();
        merged.append(&plain);
        merged.append(&fielded);
        merged.append(&plain);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged.offsets, vec![0, 2, 4, 6]);
        assert_eq!(merged.ids, vec![5, 6, 7, 8, 5, 6]);
        assert_eq!(merged.values, vec![1.0, 2.0, 1.0, 0.5, 1.0, 2.0]);
        assert_eq!(
            merged.fields,
            vec![0, 0, 2, 3, 0, 0],
            "field 0 where none was given"
        );
        assert_eq!(merged.labels, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn a_multiclass_label_is_a_class_index_below_the_classes() {
        let labels = LabelFormat::multiclass(4);
        let mut batch = Batch::new();
        parse_libsvm_line("3 1:1 2:0.5", &labels, &mut batch).unwrap();
        parse_libffm_line("0 0:7:1", 2, &labels, &mut batch).unwrap();
        assert_eq!(batch.labels, vec![3.0, 0.0]);
        let before = batch.clone();
        for (line, message) in [
            ("4 1:1", "label \"4\" is not a class index in 0..4"),
            ("-1 1:1", "label \"-1\" is not a class index"),
            ("1.5 1:1", "label \"1.5\" is not a class index"),
            ("1,2 1:1", "2 label(s) in \"1,2\", the model has 1 task(s)"),
        ] {
            let err = parse_libsvm_line(line, &labels, &mut batch).unwrap_err();
            assert!(err.contains(message), "{line}: {err}");
        }
        assert_eq!(batch, before, "refused lines change nothing");
        // Served lines have no label: they read as class 0.
        let served = LineFormat {
            format: DataFormat::Libffm,
            fields: 2,
            labels,
            numeric: Numeric::default(),
            csv: None,
            pixels: None,
        };
        served.parse_unlabeled("1:9:1", &mut batch).unwrap();
        assert_eq!((batch.len(), batch.labels[2]), (3, 0.0));
    }

    /// A bounded fuzz harness (no extra tooling): random lines, some valid,
    /// most malformed, through every parser. A parser never panics; a line
    /// it refuses leaves the batch exactly as it was (nothing half-applied);
    /// a line it accepts adds exactly one consistent example.
    #[test]
    fn fuzzed_lines_never_panic_and_refused_lines_change_nothing() {
        const ALPHABET: &[u8] = b"0123456789012345:::   \t,.-+eEnaNiIf#\x7f\"";
        let csv = csv_layout();
        let mut rng = ps_common::init::RowRng::new(99, 0);
        let mut next = |n: u64| (rng.next_u64() % n) as usize;
        let (mut accepted, mut refused) = (0, 0);
        for case in 0..30_000 {
            let len = next(40);
            let mut line: String = (0..len)
                .map(|_| ALPHABET[next(ALPHABET.len() as u64)] as char)
                .collect();
            if case % 7 == 0 {
                // Near-valid lines, so the accepting paths are fuzzed too.
                line = format!("{} {}:{}:{}", next(2), next(3), next(50), next(9));
            }
            if case % 11 == 0 {
                line.push(char::from_u32(0x80 + next(0x700) as u32).unwrap_or('x'));
            }
            if case % 13 == 0 {
                line = format!("{},{}.5,\"{}\"", next(2), next(50), next(9));
            }
            for format in 0..4 {
                let mut batch = Batch::new();
                let labels = match (format, case % 3) {
                    (_, 2) => LabelFormat::multiclass(4),
                    (3, _) => LabelFormat::binary(1),
                    (_, tasks) => LabelFormat::binary(1 + tasks),
                };
                let before = batch.clone();
                let result = match format {
                    0 => parse_libsvm_line(&line, &labels, &mut batch),
                    1 => parse_libffm_line(&line, 3, &labels, &mut batch),
                    2 => parse_criteo_line(&line, Numeric::default(), &mut batch),
                    _ => csv.parse(&line, csv_numeric(), &labels, &mut batch),
                };
                match result {
                    Err(_) => {
                        refused += 1;
                        assert_eq!(batch, before, "{line:?} (format {format}) half-applied");
                    }
                    Ok(()) => {
                        accepted += 1;
                        let width = if format == 2 { 1 } else { labels.tasks() };
                        assert_eq!(batch.len(), 1, "{line:?}");
                        assert_eq!(batch.labels.len(), width, "{line:?}");
                        assert_eq!(batch.ids.len(), batch.values.len(), "{line:?}");
                        assert_eq!(batch.offsets[1], batch.ids.len(), "{line:?}");
                        assert!(batch.fields.is_empty() || batch.fields.len() == batch.ids.len());
                        assert!(batch.values.iter().all(|v| v.is_finite()), "{line:?}");
                    }
                }
            }
        }
        assert!(
            accepted > 1_000 && refused > 10_000,
            "{accepted} / {refused}"
        );
    }

    fn write_temp(name: &str, text: &str) -> DataSource {
        let path = std::env::temp_dir().join(format!("ps-data-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        DataSource::File(path)
    }

    #[test]
    fn worker_r_of_w_reads_lines_i_mod_w() {
        let src = write_temp("shard", "1 1:1\n-1 2:1\n+1 3:1\n0 4:1\n1 5:0.5\n");
        let all: Vec<Batch> = Batches::open(&src, 1, 2, 10)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].ids, [2, 4]);
        assert_eq!(all[0].labels, [0.0, 0.0]);
        let zero: Vec<Batch> = Batches::open(&src, 0, 2, 2)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(zero.iter().map(Batch::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(zero[0].labels, [1.0, 1.0]);
        assert_eq!(zero[1].values, [0.5]);
        assert_eq!(zero[0].offsets, [0, 1, 2]);
    }

    #[test]
    fn a_malformed_line_is_reported_with_its_number() {
        let src = write_temp("bad", "1 1:1\n1 2:x\n");
        let err = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.ends_with(":2: feature \"2:x\" is not index:value with a finite value"),
            "{msg}"
        );
        let src = write_temp("label", "yes 1:1\n");
        let err = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(err.to_string().contains(":1: label \"yes\""), "{err}");
    }

    #[test]
    fn with_skip_a_malformed_line_is_counted_and_the_rest_is_read() {
        let src = write_temp("skip", "1 1:1\n1 2:x\nnope\n0 3:1\n");
        let counter = Arc::new(AtomicU64::new(0));
        let batches: Vec<Batch> = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .skip_bad_lines(Arc::clone(&counter), 0.5)
            .map(Result::unwrap)
            .collect();
        assert_eq!(batches[0].ids, [1, 3]);
        assert_eq!(batches[0].labels, [1.0, 0.0]);
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    fn read_all(src: &DataSource, max_fraction: f64) -> Result<usize, DataError> {
        let counter = Arc::new(AtomicU64::new(0));
        let mut examples = 0;
        for batch in Batches::open(src, 0, 1, 64)?.skip_bad_lines(counter, max_fraction) {
            examples += batch?.len();
        }
        Ok(examples)
    }

    #[test]
    fn skipping_fails_once_more_than_the_allowed_share_of_lines_is_bad() {
        // Every line bad (a file of another format): an error, not an
        // empty training run.
        let src = write_temp("all-bad", &"1,2,3,4\n".repeat(50));
        let err = read_all(&src, 0.01).unwrap_err();
        assert!(
            err.to_string().contains(
                "50 of the 50 lines read are malformed, more than data.max_bad_line_fraction = 0.01"
            ),
            "{err}"
        );
        // 1 bad line in 200 is within 1%; 3 are not (at the end).
        let mut text = "1 1:1\n".repeat(199);
        text.push_str("1 x\n");
        assert_eq!(read_all(&write_temp("one-bad", &text), 0.01).unwrap(), 199);
        let text = "1 1:1\n".repeat(197) + &"1 x\n".repeat(3);
        assert!(read_all(&write_temp("three-bad", &text), 0.01).is_err());
        // A long file that turns bad fails as it crosses the share, before
        // its end.
        let text = "1 1:1\n".repeat(1000) + &"1 x\n".repeat(100) + &"1 1:1\n".repeat(5000);
        let src = write_temp("turns-bad", &text);
        let counter = Arc::new(AtomicU64::new(0));
        let mut read = 0;
        let mut failed = None;
        for batch in Batches::open(&src, 0, 1, 64)
            .unwrap()
            .skip_bad_lines(counter, 0.01)
        {
            match batch {
                Ok(b) => read += b.len(),
                Err(e) => failed = Some(e),
            }
        }
        assert!(failed.is_some() && read < 1100, "read {read}");
    }

    fn ids_in_order(src: &DataSource, buffer: usize, seed: u64) -> Vec<u64> {
        Batches::open(src, 0, 1, 7)
            .unwrap()
            .shuffled(buffer, seed)
            .flat_map(|b| b.unwrap().ids)
            .collect()
    }

    #[test]
    fn a_shuffle_buffer_reorders_every_line_once_per_seed() {
        let text: String = (0..500).map(|i| format!("1 {i}:1\n")).collect();
        let src = write_temp("shuffle", &text);
        let file_order: Vec<u64> = (0..500).collect();
        assert_eq!(ids_in_order(&src, 0, 1), file_order);
        let a = ids_in_order(&src, 100, 1);
        assert_ne!(a, file_order);
        assert_eq!(
            a,
            ids_in_order(&src, 100, 1),
            "the same seed, the same order"
        );
        assert_ne!(
            a,
            ids_in_order(&src, 100, 2),
            "another epoch, another order"
        );
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, file_order, "every line exactly once");
        // A line comes out at most `buffer - 1` places before its own
        // (it must have been read), and may come out any time after.
        assert!(a.iter().enumerate().all(|(pos, &id)| id < pos as u64 + 100));
        // A buffer of the whole file mixes its two halves.
        let whole = ids_in_order(&src, 500, 1);
        assert!(whole[..250].iter().filter(|&&id| id >= 250).count() > 50);
    }

    #[test]
    fn a_shuffled_malformed_line_keeps_its_own_line_number() {
        let text: String = (0..50)
            .map(|i| {
                if i == 20 {
                    "1 oops\n".to_string()
                } else {
                    format!("1 {i}:1\n")
                }
            })
            .collect();
        let err = Batches::open(&write_temp("shuffle-bad", &text), 0, 1, 7)
            .unwrap()
            .shuffled(50, 3)
            .find_map(Result::err)
            .unwrap();
        assert!(err.to_string().contains(":21: feature \"oops\""), "{err}");
    }

    fn data_config(extra: &str) -> ps_common::config::DataConfig {
        let text = format!(
            "[data]\nformat = \"libffm\"\nfields = 2\ntrain = \"x\"\n{extra}\n\
             [model]\nkind = \"lr\"\n\
             [tables.weights]\nkind = \"sparse\"\ndim = 1\ninitializer = {{ kind = \"zeros\" }}\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\
             [tables.bias]\nkind = \"dense\"\nrows = 1\ndim = 1\ninitializer = {{ kind = \"zeros\" }}\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n"
        );
        JobConfig::from_toml(&text, std::path::Path::new("."))
            .unwrap()
            .data
    }

    /// (label, has feature 1:7) of every example read with `extra` sampling.
    fn sampled(src: &DataSource, extra: &str, seed: u64) -> Vec<(f32, bool)> {
        let data = data_config(extra);
        let mut out = Vec::new();
        for batch in Batches::open_format(src, DataFormat::Libffm, 2, 0, 1, 100)
            .unwrap()
            .sampled(&data, seed)
        {
            let b = batch.unwrap();
            for e in 0..b.len() {
                let range = b.offsets[e]..b.offsets[e + 1];
                let marked = range.clone().any(|i| b.fields[i] == 1 && b.ids[i] == 7);
                out.push((b.labels[e], marked));
            }
        }
        out
    }

    /// The sampling tests' data, in a file of `test`'s own (tests run in
    /// parallel: one rewriting a shared file under another's reader made
    /// the reader see a short file).
    fn sampling_data(test: &str) -> DataSource {
        // 20,000 lines: every 4th positive, every other one holding 1:7.
        let text: String = (0..20_000)
            .map(|i| {
                let label = if i % 4 == 0 { 1 } else { 0 };
                let feature = if i % 2 == 0 { "1:7:1" } else { "1:8:1" };
                format!("{label} 0:{i}:1 {feature}\n")
            })
            .collect();
        write_temp(&format!("sampling-{test}"), &text)
    }

    #[test]
    fn negative_down_sampling_keeps_every_positive_and_a_share_of_negatives() {
        let src = sampling_data("negatives");
        let all = sampled(&src, "", 1);
        assert_eq!(all.len(), 20_000);
        let kept = sampled(&src, "negative_sampling = 0.1", 1);
        let positives = kept.iter().filter(|(l, _)| *l > 0.0).count();
        let negatives = kept.len() - positives;
        assert_eq!(positives, 5_000, "every positive");
        assert!(
            (1_350..1_650).contains(&negatives),
            "{negatives} of 15,000 negatives"
        );
        assert_eq!(kept, sampled(&src, "negative_sampling = 0.1", 1), "seeded");
        assert_ne!(
            kept,
            sampled(&src, "negative_sampling = 0.1", 2),
            "another epoch"
        );
    }

    #[test]
    fn sampling_by_a_feature_keeps_a_share_of_the_lines_holding_it() {
        let src = sampling_data("feature");
        let rule = "sample_by_feature = [{ field = 1, id = 7, rate = 0.25 }]";
        let kept = sampled(&src, rule, 1);
        let marked = kept.iter().filter(|(_, m)| *m).count();
        assert_eq!(
            kept.len() - marked,
            10_000,
            "lines without the feature all kept"
        );
        assert!(
            (2_250..2_750).contains(&marked),
            "{marked} of 10,000 marked lines"
        );
    }

    #[test]
    fn a_batch_truncates_to_its_first_examples() {
        let mut batch = Batch::new();
        parse_libffm_line("1 0:1:1 1:2:1", 2, &LabelFormat::binary(1), &mut batch).unwrap();
        let one = batch.clone();
        parse_libffm_line("0 0:3:1", 2, &LabelFormat::binary(1), &mut batch).unwrap();
        batch.truncate(1);
        assert_eq!(batch, one);
        batch.truncate(5);
        assert_eq!(batch, one);
    }

    #[test]
    fn integer_columns_written_as_floats_are_integers() {
        assert_eq!(parse::parse_integer("260"), Some(260));
        assert_eq!(parse::parse_integer("260.0"), Some(260));
        assert_eq!(parse::parse_integer("-3.0"), Some(-3));
        assert_eq!(parse::parse_integer("1e3"), Some(1000));
        for bad in ["2.5", "x", "", "1e30", "nan", "inf"] {
            assert_eq!(parse::parse_integer(bad), None, "{bad}");
        }
        let cats = ["68fd1e64"; 26];
        let mut as_int = Batch::new();
        let mut as_float = Batch::new();
        parse_criteo_line(
            &criteo_line(1, &["260"; 13], &cats),
            IntegerFeatures::Bucketize.into(),
            &mut as_int,
        )
        .unwrap();
        parse_criteo_line(
            &criteo_line(1, &["260.0"; 13], &cats),
            IntegerFeatures::Bucketize.into(),
            &mut as_float,
        )
        .unwrap();
        assert_eq!(as_int, as_float);
    }

    #[test]
    fn a_missing_file_or_builtin_is_an_error_naming_it() {
        let err = check_readable(&DataSource::File("/no/such/file.libsvm".into())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/no/such/file.libsvm: cannot open"),
            "{err}"
        );
        let err = check_readable(&DataSource::Builtin("mnist".into())).unwrap_err();
        assert!(
            err.to_string().contains("available: a9a/train, a9a/test"),
            "{err}"
        );
    }

    #[test]
    fn libffm_lines_carry_fields_and_bad_fields_are_refused() {
        let src = write_temp("ffm", "1 0:5:1 2:7:0.5\n0 1:5:1\n");
        let b: Vec<Batch> = Batches::open_format(&src, DataFormat::Libffm, 3, 0, 1, 10)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(b[0].ids, [5, 7, 5]);
        assert_eq!(b[0].fields, [0, 2, 1]);
        assert_eq!(b[0].values, [1.0, 0.5, 1.0]);
        assert_eq!(b[0].labels, [1.0, 0.0]);
        let src = write_temp("ffm-bad", "1 0:5:1\n1 3:1:1\n");
        let err = Batches::open_format(&src, DataFormat::Libffm, 3, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(
            err.to_string()
                .contains(":2: feature \"3:1:1\": field 3 is not below"),
            "{err}"
        );
    }

    /// A line in Criteo's published layout.
    fn criteo_line(label: u8, ints: &[&str], cats: &[&str]) -> String {
        let mut cols = vec![label.to_string()];
        cols.extend(ints.iter().map(|s| s.to_string()));
        cols.extend(cats.iter().map(|s| s.to_string()));
        cols.join("\t") + "\n"
    }

    #[test]
    fn criteo_lines_hash_categories_per_field_and_bucketize_or_log_integers() {
        let mut ints = vec![""; 13];
        ints[0] = "1";
        ints[1] = "100";
        ints[2] = "-1";
        let mut cats = vec!["68fd1e64"; 26];
        cats[3] = "";
        let text = criteo_line(1, &ints, &cats) + &criteo_line(0, &ints, &cats);
        let src = write_temp("criteo", &text);
        let b = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(b.labels, [1.0, 0.0]);
        assert_eq!(
            b.offsets,
            [0, 29, 58],
            "3 integers + 26 categories (one missing)"
        );
        assert_eq!(&b.fields[..4], [0, 1, 2, 13]);
        // The same hex value in two fields is two different ids.
        assert_ne!(b.ids[3], b.ids[4]);
        assert_eq!(b.ids[..29], b.ids[29..]);
        assert_eq!(
            b.ids[1],
            hashed_id(1, &21i64.to_le_bytes()),
            "ln(100)^2 = 21.2"
        );
        let logged = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
            .unwrap()
            .numeric(IntegerFeatures::Log)
            .next()
            .unwrap()
            .unwrap();
        assert!((logged.values[1] - 101f32.ln()).abs() < 1e-6);
        assert_eq!(logged.values[2], 0.0, "negative integers count as 0");
        let dense = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
            .unwrap()
            .numeric(Numeric {
                mode: IntegerFeatures::Log,
                dense: true,
                ..Numeric::default()
            })
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            dense.offsets,
            [0, 26, 52],
            "the 26 categories are the features"
        );
        assert_eq!(dense.dense.len(), 2 * 13, "13 MLP inputs per example");
        assert!((dense.dense[1] - 101f32.ln()).abs() < 1e-6);
        assert_eq!(dense.dense[3..13], [0.0; 10], "missing integers are 0");
    }

    #[test]
    fn malformed_criteo_lines_name_the_column() {
        let cats = vec!["a"; 26];
        for (line, expect) in [
            (criteo_line(1, &[""; 12], &cats), "39 tab-separated columns"),
            (
                criteo_line(1, &["x"; 13], &cats),
                "I1 = \"x\" is not an integer",
            ),
            (
                criteo_line(1, &[""; 13], &["zz"; 26]),
                "C1 = \"zz\" is not hexadecimal",
            ),
            (
                "2".to_string() + &criteo_line(1, &[""; 13], &cats)[1..],
                "label \"2\"",
            ),
        ] {
            let src = write_temp("criteo-bad", &line);
            let err = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
                .unwrap()
                .find_map(Result::err)
                .unwrap();
            assert!(err.to_string().contains(expect), "{err}");
            assert!(err.to_string().contains(":1:"), "{err}");
        }
    }

    #[test]
    fn multi_task_lines_carry_one_label_per_task() {
        let src = write_temp("tasks", "1,0 1:1\n0,1 2:1\n1 3:1\n");
        let mut batches = Batches::open(&src, 0, 1, 10).unwrap().tasks(2);
        let err = batches.next().unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains(":3: 1 label(s) in \"1\", the model has 2 task(s)"),
            "{err}"
        );
        let src = write_temp("tasks2", "1,0 1:1\n0,1 2:1 3:1\n");
        let b = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .tasks(2)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(b.labels, [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn a_multi_class_task_reads_a_class_index_beside_binary_labels() {
        let job = crate::model::tests::job(
            "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"topic\", classes = 4 }]\n\
             tower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }",
        );
        let labels = LabelFormat::of(&job.model);
        let mut batch = Batch::new();
        parse_libffm_line("1,3 0:7:1", 2, &labels, &mut batch).unwrap();
        parse_libffm_line("-1,0 0:7:1", 2, &labels, &mut batch).unwrap();
        assert_eq!(batch.labels, [1.0, 3.0, 0.0, 0.0]);
        let before = batch.clone();
        for (line, message) in [
            ("1,4 0:7:1", "label \"4\" is not a class index in 0..4"),
            ("1,0.5 0:7:1", "label \"0.5\" is not a class index"),
            ("x,1 0:7:1", "label \"x\" is not a number"),
            ("1 0:7:1", "1 label(s) in \"1\", the model has 2 task(s)"),
        ] {
            let err = parse_libffm_line(line, 2, &labels, &mut batch).unwrap_err();
            assert!(err.contains(message), "{line}: {err}");
        }
        assert_eq!(batch, before, "refused lines change nothing");
    }

    #[test]
    fn parsing_ahead_yields_the_same_batches() {
        let direct: Vec<Batch> = Batches::open(&DataSource::Builtin("a9a/test".into()), 1, 3, 100)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let ahead: Vec<Batch> = Batches::open(&DataSource::Builtin("a9a/test".into()), 1, 3, 100)
            .unwrap()
            .ahead(4)
            .map(Result::unwrap)
            .collect();
        assert_eq!(direct, ahead);
    }

    #[test]
    fn the_builtin_a9a_has_the_published_row_counts() {
        let count = |name: &str| -> usize {
            Batches::open(&DataSource::Builtin(name.into()), 0, 1, 4096)
                .unwrap()
                .map(|b| b.unwrap().len())
                .sum()
        };
        assert_eq!(count("a9a/train"), 32_561);
        assert_eq!(count("a9a/test"), 16_281);
    }
}

/// Properties of the line parsers over generated lines (proptest).
mod properties {
    use super::super::parse::*;
    use super::super::*;
    use super::{csv_layout, csv_numeric};
    use proptest::prelude::*;
    use ps_common::config::IntegerFeatures;

    /// Lines near the formats' grammar, and arbitrary text.
    fn any_line() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            (0u32..3).prop_map(|l| l.to_string()),
            (0u64..1000, -5.0f32..5.0).prop_map(|(i, v)| format!("{i}:{v}")),
            (0u32..4, 0u64..1000, -5.0f32..5.0).prop_map(|(f, i, v)| format!("{f}:{i}:{v}")),
            prop::sample::select(vec![
                "nan", "inf", "-", ":", "::", "1e999", "\t", "é", "1,0", ""
            ])
            .prop_map(str::to_string),
            "[ -~]{0,12}",
        ];
        prop::collection::vec(token, 0..8).prop_map(|tokens| tokens.join(" "))
    }

    /// Criteo TSV lines, mostly well formed: 40 columns of a 0/1 label, 13
    /// integers and 26 hexadecimal categories (any may be empty), with now
    /// and then a column too many or too few, a bad label or a bad field.
    fn criteo_line() -> impl Strategy<Value = String> {
        let label = prop_oneof![8 => Just("0"), 8 => Just("1"), 1 => Just("2"), 1 => Just("")];
        let integer = prop_oneof![
            30 => Just(String::new()),
            60 => (-5i64..100_000).prop_map(|v| v.to_string()),
            5 => any::<i64>().prop_map(|v| v.to_string()),
            1 => prop::sample::select(vec!["1.5", "x", " 3", "999999999999999999999999999999"])
                .prop_map(str::to_string),
        ];
        let category = prop_oneof![
            30 => Just(String::new()),
            60 => "[0-9a-f]{8}",
            5 => "[0-9a-fA-F]{1,16}",
            1 => prop::sample::select(vec!["zz", "é", "0x1f", "12 34"]).prop_map(str::to_string),
        ];
        let integers = prop_oneof![8 => Just(13usize), 1 => Just(12), 1 => Just(14)];
        let categories = prop_oneof![8 => Just(26usize), 1 => Just(25), 1 => Just(27)];
        (label, integers, categories)
            .prop_flat_map(move |(label, n, m)| {
                (
                    Just(label),
                    prop::collection::vec(integer.clone(), n),
                    prop::collection::vec(category.clone(), m),
                )
            })
            .prop_map(|(label, integers, categories)| {
                std::iter::once(label.to_string())
                    .chain(integers)
                    .chain(categories)
                    .collect::<Vec<_>>()
                    .join("\t")
            })
    }

    /// Parses `line` as Criteo into a batch already holding one Criteo
    /// example; checks it added one consistent example or changed nothing.
    /// Returns whether it was accepted.
    fn check_criteo(line: &str, integers: Numeric) -> Result<bool, TestCaseError> {
        let mut batch = Batch::new();
        let first = ["1"]
            .into_iter()
            .chain(["7"; CRITEO_INTEGERS])
            .chain(["68fd1e64"; CRITEO_CATEGORIES])
            .collect::<Vec<_>>()
            .join("\t");
        prop_assert!(parse_criteo_line(&first, integers, &mut batch).is_ok());
        let before = batch.clone();
        match parse_criteo_line(line, integers, &mut batch) {
            Err(message) => {
                prop_assert!(!message.is_empty());
                prop_assert_eq!(batch, before);
                Ok(false)
            }
            Ok(()) => {
                prop_assert_eq!(batch.len(), 2);
                prop_assert_eq!(batch.ids.len(), batch.values.len());
                prop_assert_eq!(batch.fields.len(), batch.ids.len(), "a field per feature");
                prop_assert_eq!(*batch.offsets.last().unwrap_or(&0), batch.ids.len());
                let added = &batch.fields[before.ids.len()..];
                prop_assert!(added.len() >= CRITEO_CATEGORIES && added.len() <= 39);
                prop_assert!(
                    added.windows(2).all(|w| w[0] < w[1]),
                    "fields in column order"
                );
                prop_assert!(added.iter().all(|&f| (f as usize) < 39));
                prop_assert!(batch.values.iter().all(|v| v.is_finite()));
                Ok(true)
            }
        }
    }

    #[test]
    fn the_criteo_property_reaches_its_accept_path() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = criteo_line();
        let accepted = (0..500)
            .filter(|_| {
                let line = strategy.new_tree(&mut runner).unwrap().current();
                check_criteo(&line, IntegerFeatures::Bucketize.into()).unwrap()
            })
            .count();
        assert!(
            accepted >= 100,
            "only {accepted} of 500 generated lines were accepted"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn a_line_adds_one_consistent_example_or_changes_nothing(
            line in any_line(),
            kind in 0usize..3,
            format in 0usize..4,
        ) {
            // One or two binary labels, or a class index of 4 classes.
            let labels = match (format, kind) {
                (_, 2) => LabelFormat::multiclass(4),
                (3, _) => LabelFormat::binary(1),
                (_, tasks) => LabelFormat::binary(1 + tasks),
            };
            // A batch that already holds an example.
            let mut batch = Batch::new();
            let first = if labels.tasks() == 2 { "1,0 3:1" } else { "1 3:1" };
            prop_assert!(parse_libsvm_line(first, &labels, &mut batch).is_ok());
            let before = batch.clone();
            let result = match format {
                0 => parse_libsvm_line(&line, &labels, &mut batch),
                1 => parse_libffm_line(&line, 4, &labels, &mut batch),
                2 => parse_criteo_line(&line, Numeric::default(), &mut batch),
                _ => csv_layout().parse(&line, csv_numeric(), &labels, &mut batch),
            };
            match result {
                Err(message) => {
                    prop_assert!(!message.is_empty());
                    prop_assert_eq!(batch, before);
                }
                Ok(()) => {
                    prop_assert_eq!(batch.len(), before.len() + 1);
                    prop_assert_eq!(batch.ids.len(), batch.values.len());
                    prop_assert_eq!(*batch.offsets.last().unwrap_or(&0), batch.ids.len());
                    prop_assert!(batch.values.iter().all(|v| v.is_finite()));
                }
            }
        }

        #[test]
        fn a_criteo_line_adds_one_consistent_example_or_changes_nothing(
            line in criteo_line(),
            log in any::<bool>(),
        ) {
            let integers = if log { IntegerFeatures::Log } else { IntegerFeatures::Bucketize };
            check_criteo(&line, integers.into())?;
        }
    }
}
