//! CSV with a header line: where each configured column is in a file
//! ([`CsvLayout`], from the header's names), splitting a line into its
//! cells (quoted values with `""` escapes), and parsing a line into an
//! example.

use std::borrow::Cow;

use ps_common::config::CsvConfig;

use super::Batch;
use super::parse::{LabelFormat, Numeric, hashed_id};

/// Where the label, numeric and categorical columns of a file are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvLayout {
    delimiter: u8,
    /// Cells a line must have.
    width: usize,
    /// Label columns, in task order (none for serving's unlabeled lines).
    labels: Vec<usize>,
    /// Numeric columns: fields `0..numeric.len()`.
    numeric: Vec<usize>,
    /// Their names, for errors.
    numeric_names: Vec<String>,
    /// Categorical columns: the fields after the numeric ones.
    categorical: Vec<usize>,
}

impl CsvLayout {
    /// The layout of a file whose first line is `header`; the error names
    /// a configured column the header lacks or holds twice.
    pub fn from_header(header: &str, csv: &CsvConfig) -> Result<CsvLayout, String> {
        let delimiter = csv.delimiter as u8;
        let header = header.trim_start_matches('\u{feff}');
        let mut cells = Vec::new();
        split(header.trim_end_matches(['\n', '\r']), delimiter, &mut cells)
            .map_err(|e| format!("header: {e}"))?;
        let names: Vec<&str> = cells.iter().map(|c| c.trim()).collect();
        let find = |name: &str| -> Result<usize, String> {
            let mut at = names.iter().enumerate().filter(|(_, n)| **n == name.trim());
            match (at.next(), at.next()) {
                (Some((i, _)), None) => Ok(i),
                (Some(_), Some(_)) => Err(format!("header: column {name:?} appears twice")),
                (None, _) => Err(format!(
                    "header: no column {name:?} (named in data.csv; the header has {})",
                    preview(&names)
                )),
            }
        };
        let columns = |list: &[String]| list.iter().map(|n| find(n)).collect::<Result<Vec<_>, _>>();
        Ok(CsvLayout {
            delimiter,
            width: names.len(),
            labels: csv
                .label
                .names()
                .into_iter()
                .map(find)
                .collect::<Result<_, _>>()?,
            numeric: columns(&csv.numeric)?,
            numeric_names: csv.numeric.clone(),
            categorical: columns(&csv.categorical)?,
        })
    }

    /// The layout of a line without its label, as serving takes it: the
    /// numeric columns, then the categorical ones, in the job's order.
    pub fn unlabeled(csv: &CsvConfig) -> CsvLayout {
        let numeric = csv.numeric.len();
        CsvLayout {
            delimiter: csv.delimiter as u8,
            width: csv.fields() as usize,
            labels: Vec::new(),
            numeric: (0..numeric).collect(),
            numeric_names: csv.numeric.clone(),
            categorical: (numeric..csv.fields() as usize).collect(),
        }
    }

    /// The first label's text of `line` (for sampling before the rest is
    /// parsed); `None` when the line is too short or unlabeled.
    pub fn first_label<'a>(&self, line: &'a str) -> Option<Cow<'a, str>> {
        let mut cells = Vec::new();
        split(
            line.trim_end_matches(['\n', '\r']),
            self.delimiter,
            &mut cells,
        )
        .ok()?;
        let at = *self.labels.first()?;
        (at < cells.len()).then(|| cells.swap_remove(at))
    }

    /// Parses `line` into an example appended to `batch` (labels 0 when
    /// the layout has none, one per task); on error the batch is left
    /// unchanged.
    pub fn parse(
        &self,
        line: &str,
        numeric: Numeric,
        labels: &LabelFormat,
        batch: &mut Batch,
    ) -> Result<(), String> {
        let mut cells = Vec::with_capacity(self.width);
        split(
            line.trim_end_matches(['\n', '\r']),
            self.delimiter,
            &mut cells,
        )?;
        if cells.len() != self.width {
            return Err(format!(
                "{} cells, the header has {} columns",
                cells.len(),
                self.width
            ));
        }
        let labels = if self.labels.is_empty() {
            vec![0.0; labels.tasks()]
        } else {
            self.labels
                .iter()
                .enumerate()
                .map(|(t, &c)| labels.parse_one(t, cells[c].trim()))
                .collect::<Result<Vec<f32>, String>>()?
        };
        let name = |field: usize| &self.numeric_names[field];
        let mut features = Vec::with_capacity(self.numeric.len() + self.categorical.len());
        let mut dense = vec![0f32; numeric.dense_inputs(self.numeric.len())];
        for (field, &column) in self.numeric.iter().enumerate() {
            let text = cells[column].trim();
            if text.is_empty() {
                continue;
            }
            let v = text
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    format!("column {} = {text:?} is not a finite number", name(field))
                })?;
            numeric
                .take(field, v, &mut features, &mut dense)
                .map_err(|e| format!("column {} = {text:?}: {e}", name(field)))?;
        }
        for (j, &column) in self.categorical.iter().enumerate() {
            let field = self.numeric.len() + j;
            features.push((field, hashed_id(field, cells[column].as_bytes()), 1.0));
        }
        batch.push_fielded_example(&features, &dense, &labels);
        Ok(())
    }
}

/// The first names of a header, for an error message.
fn preview(names: &[&str]) -> String {
    let shown: Vec<String> = names.iter().take(8).map(|n| format!("{n:?}")).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Splits `line` at `delimiter` into `cells`. A cell starting with `"` is
/// quoted: it ends at the next lone `"`, and `""` inside stands for one.
/// A quoted value spanning lines is an error.
pub fn split<'a>(
    line: &'a str,
    delimiter: u8,
    cells: &mut Vec<Cow<'a, str>>,
) -> Result<(), String> {
    let bytes = line.as_bytes();
    let mut at = 0;
    loop {
        if bytes.get(at) == Some(&b'"') {
            let (cell, next) = quoted(line, at + 1)?;
            cells.push(cell);
            match bytes.get(next) {
                None => return Ok(()),
                Some(&b) if b == delimiter => at = next + 1,
                Some(_) => {
                    return Err(format!("cell {}: text after a closing quote", cells.len()));
                }
            }
        } else {
            let end = bytes[at..]
                .iter()
                .position(|&b| b == delimiter)
                .map_or(bytes.len(), |p| at + p);
            cells.push(Cow::Borrowed(&line[at..end]));
            if end == bytes.len() {
                return Ok(());
            }
            at = end + 1;
        }
    }
}

/// The quoted cell whose text starts at `start` (after its opening
/// quote), and where the text after its closing quote starts.
fn quoted(line: &str, start: usize) -> Result<(Cow<'_, str>, usize), String> {
    let bytes = line.as_bytes();
    let mut owned: Option<String> = None;
    let mut from = start;
    let mut at = start;
    while at < bytes.len() {
        if bytes[at] == b'"' {
            if bytes.get(at + 1) == Some(&b'"') {
                owned
                    .get_or_insert_with(String::new)
                    .push_str(&line[from..=at]);
                at += 2;
                from = at;
                continue;
            }
            let cell = match owned {
                Some(mut text) => {
                    text.push_str(&line[from..at]);
                    Cow::Owned(text)
                }
                None => Cow::Borrowed(&line[start..at]),
            };
            return Ok((cell, at + 1));
        }
        at += 1;
    }
    Err("a quoted value does not end on its line (values spanning lines are not supported)".into())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use ps_common::config::{DataSource, JobConfig};

    use super::super::{Batch, Batches, LineFormat};
    use super::*;

    /// A job reading `file` as CSV with `[data]` keys `extra` (`fields`
    /// must match the columns).
    fn job(file: &Path, extra: &str) -> JobConfig {
        let text = format!(
            "[data]\nformat = \"csv\"\ntrain = {file:?}\n{extra}\n\
             [model]\nkind = \"lr\"\n\
             [tables.weights]\nkind = \"sparse\"\ndim = 1\ninitializer = {{ kind = \"zeros\" }}\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\
             [tables.bias]\nkind = \"dense\"\nrows = 1\ndim = 1\ninitializer = {{ kind = \"zeros\" }}\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n"
        );
        JobConfig::from_toml(&text, Path::new(".")).unwrap()
    }

    const COLUMNS: &str = "fields = 3\nintegers = \"value\"\n\
        csv = { label = \"click\", numeric = [\"age\", \"price\"], categorical = [\"country\"] }";

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("ps-csv-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }

    /// Every batch of `job`'s training file for worker `rank` of `world`.
    fn read(job: &JobConfig, rank: usize, world: usize) -> Result<Batch, String> {
        let skipped = Default::default();
        let mut all = Batch::new();
        for batch in Batches::for_job(job, &job.data.train, rank, world, 2, &skipped)
            .map_err(|e| e.to_string())?
        {
            all.append(&batch.map_err(|e| e.to_string())?);
        }
        Ok(all)
    }

    #[test]
    fn the_header_names_the_columns_and_each_line_becomes_an_example() {
        let path = write(
            "basic",
            "id,click,country,age,price\n\
             1,1,de,30,2.5\n\
             2,0,\"fr, south\",,0.5\n\
             3,1,de,41,1e3\n",
        );
        let job = job(&path, COLUMNS);
        let b = read(&job, 0, 1).unwrap();
        assert_eq!(b.labels, [1.0, 0.0, 1.0]);
        assert_eq!(b.offsets, [0, 3, 5, 8], "an empty number is left out");
        assert_eq!(b.fields, [0, 1, 2, 1, 2, 0, 1, 2]);
        assert_eq!(b.values, [30.0, 2.5, 1.0, 0.5, 1.0, 41.0, 1000.0, 1.0]);
        assert_eq!(b.ids[2], b.ids[7], "the same country is the same id");
        assert_eq!(
            b.ids[4],
            hashed_id(2, b"fr, south"),
            "quotes are not part of the value"
        );
        assert_eq!(b.ids[0], b.ids[5], "one id per numeric column");

        // Columns are found by name: another order gives the same examples,
        // and worker 1 of 2 reads lines 2 (and 4) after the header.
        let moved = write(
            "moved",
            "price,age,country,click,id\n2.5,30,de,1,1\n0.5,,\"fr, south\",0,2\n1e3,41,de,1,3\n",
        );
        assert_eq!(read(&self::job(&moved, COLUMNS), 0, 1).unwrap(), b);
        let second = read(&job, 1, 2).unwrap();
        assert_eq!(
            second.labels,
            [0.0],
            "data line 2 (file line 3) is worker 1's"
        );
        assert_eq!(second.values, [0.5, 1.0]);

        // Serving takes the numeric then categorical columns, no label.
        let format = LineFormat::of_job(&job);
        let mut served = Batch::new();
        format.parse_unlabeled("30,2.5,de", &mut served).unwrap();
        assert_eq!(served.ids, b.ids[..3]);
        assert_eq!(served.values, b.values[..3]);
    }

    #[test]
    fn bad_headers_and_lines_are_errors_naming_file_line_and_column() {
        let cases = [
            (
                "id,click,age,price\n1,1,3,4\n",
                ":1: header: no column \"country\"",
            ),
            (
                "click,age,price,country,age\n",
                ":1: header: column \"age\" appears twice",
            ),
            (
                "click,age,price,country\n1,2,3\n",
                ":2: 3 cells, the header has 4 columns",
            ),
            (
                "click,age,price,country\n1,old,3,de\n",
                ":2: column age = \"old\" is not a finite number",
            ),
            (
                "click,age,price,country\n1,2,1e39,de\n",
                ":2: column price = \"1e39\": past a 32-bit",
            ),
            (
                "click,age,price,country\n1,2,3,\"de\n",
                ":2: a quoted value does not end on its line",
            ),
            (
                "click,age,price,country\nyes,2,3,de\n",
                ":2: label \"yes\" is not a number",
            ),
        ];
        for (i, (text, expected)) in cases.into_iter().enumerate() {
            let path = write(&format!("bad{i}"), text);
            let err = read(&job(&path, COLUMNS), 0, 1).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with(&path.display().to_string()), "{err}");
        }
    }

    #[test]
    fn cells_split_at_the_delimiter_outside_quotes() {
        let cells = |line: &str, d: u8| {
            let mut out = Vec::new();
            split(line, d, &mut out).map(|()| out.iter().map(|c| c.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(cells("a,b,,c", b',').unwrap(), ["a", "b", "", "c"]);
        assert_eq!(cells("a,", b',').unwrap(), ["a", ""]);
        assert_eq!(
            cells("\"x,y\",\"say \"\"hi\"\"\"", b',').unwrap(),
            ["x,y", "say \"hi\""]
        );
        assert_eq!(cells("\"\"", b',').unwrap(), [""]);
        assert_eq!(cells("a\tb,c", b'\t').unwrap(), ["a", "b,c"]);
        assert!(
            cells("\"a\"b,c", b',')
                .unwrap_err()
                .contains("after a closing quote")
        );
        assert!(cells("\"a", b',').is_err());
    }

    #[test]
    fn numeric_values_are_clipped_and_normalised_as_configured() {
        let path = write(
            "numeric",
            "click,age,price,country\n1,-5,50,de\n0,2,7.5,de\n",
        );
        let values = |numeric: &str| {
            let extra = COLUMNS.replace("integers = \"value\"", numeric);
            read(&job(&path, &extra), 0, 1).unwrap().values
        };
        assert_eq!(
            values("integers = \"value\""),
            [-5.0, 50.0, 1.0, 2.0, 7.5, 1.0]
        );
        assert_eq!(
            values("integers = \"value\"\nnumeric = { clip = [0.0, 10.0] }"),
            [0.0, 10.0, 1.0, 2.0, 7.5, 1.0]
        );
        assert_eq!(
            values(
                "integers = \"value\"\nnumeric = { clip = [0.0, 10.0], normalize = \"min_max\" }"
            ),
            [0.0, 1.0, 1.0, 0.2, 0.75, 1.0]
        );
        let logged = values("integers = \"log\"\nnumeric = { clip = [0.0, 2.0] }");
        assert_eq!(logged[..2], [0.0, 2.0], "ln(1 + max(v, 0)), then clipped");
        assert!((logged[3] - 3f32.ln()).abs() < 1e-6);
        let bucketized = read(
            &job(&path, &COLUMNS.replace("integers = \"value\"", "")),
            0,
            1,
        )
        .unwrap();
        assert_eq!(bucketized.values, [1.0; 6], "bucket ids carry value 1");
        assert_eq!(bucketized.ids[3], hashed_id(0, &2i64.to_le_bytes()));
    }

    #[test]
    fn dense_numeric_columns_become_mlp_inputs_not_features() {
        let path = write("dense", "click,age,price,country\n1,-5,50,de\n0,,7.5,fr\n");
        let extra = COLUMNS.replace(
            "integers = \"value\"",
            "integers = \"value\"\nnumeric = { clip = [0.0, 10.0] }",
        );
        let text = std::fs::read_to_string(&path).unwrap();
        // The reader reads [data] only (the job's checks want an MLP model).
        let mut job = job(&path, &extra);
        job.data.numeric.dense = true;
        let b = read(&job, 0, 1).unwrap();
        assert_eq!(
            b.dense,
            [0.0, 10.0, 0.0, 7.5],
            "clipped; a missing value is 0 ({text:?})"
        );
        assert_eq!(b.fields, [2, 2], "only the categorical column is a feature");
        let mut served = Batch::new();
        LineFormat::of_job(&job)
            .parse_unlabeled("3,4,de", &mut served)
            .unwrap();
        assert_eq!(served.dense, [3.0, 4.0]);
    }

    #[test]
    fn negative_sampling_reads_the_label_column_by_name() {
        let lines: String = (0..2000)
            .map(|i| format!("{i},{},{},de\n", i % 2, i % 7))
            .collect();
        let path = write("sampled", &format!("id,click,age,country\n{lines}"));
        let mut job = job(
            &path,
            "fields = 2\nnegative_sampling = 0.25\n\
             csv = { label = \"click\", numeric = [\"age\"], categorical = [\"country\"] }",
        );
        job.data.train = DataSource::File(path);
        let skipped = Default::default();
        let mut labels = Vec::new();
        for batch in Batches::for_job(&job, &job.data.train, 0, 1, 64, &skipped)
            .unwrap()
            .sampled(&job.data, 7)
        {
            labels.extend(batch.unwrap().labels);
        }
        let positives = labels.iter().filter(|&&l| l > 0.0).count();
        let negatives = labels.len() - positives;
        assert_eq!(positives, 1000, "every positive is kept");
        assert!(
            (200..300).contains(&negatives),
            "{negatives} of 1000 negatives kept"
        );
    }
}
