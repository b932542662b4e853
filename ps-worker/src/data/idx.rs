//! IDX files, MNIST's format, read as `pixels` lines: a `format =
//! "pixels"` source whose file starts with IDX's unsigned-byte magic is a
//! file of images (`[n, rows, cols]` or `[n, rows, cols, channels]`), and
//! its labels are the IDX file of `n` bytes beside it, named as MNIST names
//! them (`train-images-idx3-ubyte` -> `train-labels-idx1-ubyte`). Each
//! image becomes the line `label,p0,p1,...` that [`super::Pixels`] parses,
//! so sharding, shuffling, augmentation and bad-input handling are the
//! pixels format's.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use ps_common::config::DataSource;

use super::DataError;

/// Magic of an IDX file of unsigned bytes; the fourth byte is the number
/// of dimensions.
const UBYTE: [u8; 3] = [0, 0, 8];
/// Most pixels per image (a header claiming more is refused before
/// anything is allocated for it).
const MAX_PIXELS: u64 = 1 << 24;

/// `reader` of `source` as `pixels` lines when it is an IDX images file;
/// else `reader` itself.
pub(super) fn images_as_lines(
    source: &DataSource,
    mut reader: Box<dyn BufRead + Send>,
) -> Result<Box<dyn BufRead + Send>, DataError> {
    let error = |message: String| DataError::Io {
        source_name: source.to_string(),
        message,
    };
    let DataSource::File(path) = source else {
        return Ok(reader);
    };
    if !starts_with_images(&mut reader).map_err(|e| error(format!("cannot read: {e}")))? {
        return Ok(reader);
    }
    let labels = labels_beside(path).ok_or_else(|| {
        error(
            "an IDX images file is read with the labels file beside it: name them as MNIST \
             does (NAME-images-idx3-ubyte and NAME-labels-idx1-ubyte)"
                .into(),
        )
    })?;
    Ok(Box::new(IdxLines::open(reader, &labels).map_err(error)?))
}

/// Whether `reader` starts with an IDX images header (3 or 4 dimensions
/// of unsigned bytes). Consumes nothing.
fn starts_with_images(reader: &mut dyn BufRead) -> io::Result<bool> {
    let head = reader.fill_buf()?;
    Ok(head.len() >= 4 && head[..3] == UBYTE && matches!(head[3], 3 | 4))
}

/// The labels file MNIST's naming puts beside `images`.
fn labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name.replace("images-idx3-ubyte", "labels-idx1-ubyte");
    (labels != name).then(|| images.with_file_name(labels))
}

/// An images file and its labels, streamed as `pixels` lines.
struct IdxLines {
    images: Box<dyn BufRead + Send>,
    labels: BufReader<File>,
    /// Bytes per image.
    pixels: usize,
    /// Images not yet read.
    left: u64,
    /// The current line and how much of it was handed out.
    line: Vec<u8>,
    at: usize,
    image: Vec<u8>,
}

impl IdxLines {
    /// Reads both headers: the images' (from `images`, which
    /// [`starts_with_images`] accepted) and those of `labels_path`; they
    /// must count the same examples.
    fn open(mut images: Box<dyn BufRead + Send>, labels_path: &Path) -> Result<IdxLines, String> {
        let mut magic = [0u8; 4];
        images
            .read_exact(&mut magic)
            .map_err(|e| format!("cannot read the IDX header: {e}"))?;
        let dims = usize::from(magic[3]);
        let mut sizes = Vec::with_capacity(dims);
        for d in 0..dims {
            sizes.push(u64::from(read_u32(&mut images).map_err(|e| {
                format!("the IDX header ends before dimension {d} of {dims}: {e}")
            })?));
        }
        let count = sizes[0];
        let pixels: u64 = sizes[1..].iter().product();
        if pixels == 0 || pixels > MAX_PIXELS {
            return Err(format!(
                "an IDX image of {:?} pixels: expected between 1 and {MAX_PIXELS}",
                &sizes[1..]
            ));
        }
        let file = File::open(labels_path).map_err(|e| {
            format!(
                "IDX images need their labels beside them: cannot open {}: {e}",
                labels_path.display()
            )
        })?;
        let mut labels = BufReader::new(file);
        let mut magic = [0u8; 4];
        let header = labels
            .read_exact(&mut magic)
            .and_then(|()| read_u32(&mut labels));
        let labelled = match header {
            Ok(n) if magic == [0, 0, 8, 1] => u64::from(n),
            _ => {
                return Err(format!(
                    "{} is not an IDX file of labels (1 dimension of unsigned bytes)",
                    labels_path.display()
                ));
            }
        };
        if labelled != count {
            return Err(format!(
                "{count} images but {labelled} labels in {}",
                labels_path.display()
            ));
        }
        Ok(IdxLines {
            images,
            labels,
            pixels: pixels as usize,
            left: count,
            line: Vec::new(),
            at: 0,
            image: vec![0; pixels as usize],
        })
    }

    /// Formats the next image as a line.
    fn next_line(&mut self) -> io::Result<()> {
        let mut label = [0u8; 1];
        self.labels
            .read_exact(&mut label)
            .map_err(|e| truncated("labels", e))?;
        self.images
            .read_exact(&mut self.image)
            .map_err(|e| truncated("images", e))?;
        self.line.clear();
        self.line.reserve(self.pixels * 4 + 4);
        write_number(&mut self.line, label[0]);
        for &p in &self.image {
            self.line.push(b',');
            write_number(&mut self.line, p);
        }
        self.line.push(b'\n');
        self.at = 0;
        self.left -= 1;
        Ok(())
    }
}

fn truncated(what: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("the IDX {what} file ends before its header's count: {e}"),
    )
}

fn read_u32(reader: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    reader.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

/// `value` in decimal.
fn write_number(out: &mut Vec<u8>, value: u8) {
    if value >= 100 {
        out.push(b'0' + value / 100);
    }
    if value >= 10 {
        out.push(b'0' + value / 10 % 10);
    }
    out.push(b'0' + value % 10);
}

impl Read for IdxLines {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for IdxLines {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.at == self.line.len() && self.left > 0 {
            self.next_line()?;
        }
        Ok(&self.line[self.at..])
    }

    fn consume(&mut self, amount: usize) {
        self.at = (self.at + amount).min(self.line.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Batches, Pixels};
    use ps_common::config::{DataFormat, ImageConfig};

    /// A folder with `NAME-images-idx3-ubyte` (2x2 images) and its labels.
    fn write_pair(tag: &str, images: &[[u8; 4]], labels: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-idx-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = vec![0, 0, 8, 3];
        for size in [images.len() as u32, 2, 2] {
            bytes.extend(size.to_be_bytes());
        }
        bytes.extend(images.iter().flatten());
        std::fs::write(dir.join("t-images-idx3-ubyte"), bytes).unwrap();
        let mut bytes = vec![0, 0, 8, 1];
        bytes.extend((labels.len() as u32).to_be_bytes());
        bytes.extend(labels);
        std::fs::write(dir.join("t-labels-idx1-ubyte"), bytes).unwrap();
        dir.join("t-images-idx3-ubyte")
    }

    fn batches(images: &Path, rank: usize, world: usize) -> Result<Batches, DataError> {
        let source = DataSource::File(images.to_path_buf());
        let mut batches = Batches::open_format(&source, DataFormat::Pixels, 1, rank, world, 8)?;
        batches.pixels = Some(Pixels {
            image: ImageConfig {
                height: 2,
                width: 2,
                channels: 1,
                scale: 255.0,
            },
            classes: 10,
        });
        Ok(batches)
    }

    #[test]
    fn mnist_files_read_as_labelled_scaled_images() {
        let images = write_pair(
            "read",
            &[[0, 255, 51, 102], [1, 2, 3, 4], [9, 9, 9, 9]],
            &[7, 0, 9],
        );
        let batch = batches(&images, 0, 1).unwrap().next().unwrap().unwrap();
        assert_eq!(batch.labels, [7.0, 0.0, 9.0]);
        assert_eq!(&batch.dense[..4], [0.0, 1.0, 0.2, 0.4]);
        assert_eq!(batch.dense.len(), 12);
        // Workers split the images as they split lines.
        let second = batches(&images, 1, 2).unwrap().next().unwrap().unwrap();
        assert_eq!(second.labels, [0.0]);
        std::fs::remove_dir_all(images.parent().unwrap()).ok();
    }

    #[test]
    fn mismatched_or_missing_labels_and_short_files_are_errors_naming_the_file() {
        let images = write_pair("bad", &[[1, 2, 3, 4], [5, 6, 7, 8]], &[1]);
        let err = batches(&images, 0, 1).err().unwrap().to_string();
        assert!(err.contains("2 images but 1 labels in"), "{err}");
        assert!(err.contains("t-images-idx3-ubyte"), "{err}");

        let images = write_pair("short", &[[1, 2, 3, 4], [5, 6, 7, 8]], &[1, 2]);
        let mut bytes = std::fs::read(&images).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&images, bytes).unwrap();
        let err = batches(&images, 0, 1).unwrap().next().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("ends before its header's count"),
            "{err}"
        );

        let renamed = images.with_file_name("digits.idx");
        std::fs::rename(&images, &renamed).unwrap();
        let err = batches(&renamed, 0, 1).err().unwrap().to_string();
        assert!(err.contains("NAME-labels-idx1-ubyte"), "{err}");

        std::fs::remove_file(images.with_file_name("t-labels-idx1-ubyte")).unwrap();
        let images = write_pair("short", &[[1, 2, 3, 4]], &[1]);
        std::fs::remove_file(images.with_file_name("t-labels-idx1-ubyte")).unwrap();
        let err = batches(&images, 0, 1).err().unwrap().to_string();
        assert!(err.contains("cannot open"), "{err}");
        std::fs::remove_dir_all(images.parent().unwrap()).ok();
    }

    #[test]
    fn a_header_claiming_huge_images_is_refused_before_allocating() {
        let images = write_pair("huge", &[[1, 2, 3, 4]], &[1]);
        let mut bytes = std::fs::read(&images).unwrap();
        bytes[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&images, bytes).unwrap();
        let err = batches(&images, 0, 1).err().unwrap().to_string();
        assert!(err.contains("expected between 1 and"), "{err}");
        std::fs::remove_dir_all(images.parent().unwrap()).ok();
    }

    #[test]
    fn text_pixels_files_are_read_as_they_are() {
        let dir = std::env::temp_dir().join(format!("ps-idx-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("digits.csv");
        std::fs::write(&path, "3,0,255,0,255\n").unwrap();
        let batch = batches(&path, 0, 1).unwrap().next().unwrap().unwrap();
        assert_eq!(batch.labels, [3.0]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
