//! Images: the `pixels` line format ([`Pixels`]) and the random changes
//! made to training images on the parsing thread ([`Augment`]).
//!
//! An image lives in [`Batch::dense`] as `height * width * channels`
//! scaled values, row by row with channels last (HWC), which is the NHWC
//! layout the backends' image ops read. Its label is a class index.

use ps_common::config::{AugmentConfig, ImageConfig, JobConfig};
use ps_common::init::RowRng;

use super::Batch;
use super::parse::parse_class;

/// How a `pixels` line reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pixels {
    /// The images' shape and scale.
    pub image: ImageConfig,
    /// Labels are class indices below this.
    pub classes: usize,
}

impl Pixels {
    /// The pixel format of `job`, if its data is images.
    pub fn of_job(job: &JobConfig) -> Option<Pixels> {
        job.data.image.map(|image| Pixels {
            image,
            classes: job.model.classes() as usize,
        })
    }

    /// Parses `label,p0,p1,...` (commas or spaces) and appends the image
    /// to `batch`; on error the batch is left unchanged.
    pub fn parse_line(&self, text: &str, batch: &mut Batch) -> Result<(), String> {
        let mut tokens = text
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|t| !t.is_empty());
        let class = parse_class(tokens.next().unwrap_or_default(), self.classes)?;
        let want = self.image.pixels();
        let start = batch.dense.len();
        let mut count = 0;
        for token in tokens {
            count += 1;
            if count > want {
                break;
            }
            match token.parse::<f32>() {
                Ok(v) if v.is_finite() => batch.dense.push(v / self.image.scale),
                _ => {
                    batch.dense.truncate(start);
                    return Err(format!("pixel {count} ({token:?}) is not a finite number"));
                }
            }
        }
        if count != want {
            batch.dense.truncate(start);
            let (h, w, c) = (self.image.height, self.image.width, self.image.channels);
            let found = if count > want {
                format!("more than {want}")
            } else {
                count.to_string()
            };
            return Err(format!(
                "{found} pixel values, [data.image] says {h} x {w} x {c} = {want}"
            ));
        }
        batch.push_example(&[class]);
        Ok(())
    }
}

/// Random shifts, flips and noise for training images, seeded so that a
/// run (and a resumed epoch) sees the same images again.
#[derive(Debug, Clone)]
pub struct Augment {
    config: AugmentConfig,
    image: ImageConfig,
    rng: RowRng,
}

impl Augment {
    /// Augmentation of `image`-shaped examples, drawn from `seed`.
    pub fn new(config: AugmentConfig, image: ImageConfig, seed: u64) -> Augment {
        Augment {
            config,
            image,
            rng: RowRng::new(seed, 0x4155_474d),
        }
    }

    /// Changes every image of `batch` in place.
    pub fn apply(&mut self, batch: &mut Batch) {
        let values = self.image.pixels();
        let mut scratch = vec![0f32; values];
        for image in batch.dense.chunks_exact_mut(values.max(1)) {
            self.apply_one(image, &mut scratch);
        }
    }

    fn apply_one(&mut self, image: &mut [f32], scratch: &mut [f32]) {
        let (h, w, c) = (
            self.image.height as i64,
            self.image.width as i64,
            self.image.channels as usize,
        );
        let s = i64::from(self.config.shift);
        let mut draw = |n: i64| (self.rng.next_u64() % n as u64) as i64;
        let (dy, dx) = if s > 0 {
            (draw(2 * s + 1) - s, draw(2 * s + 1) - s)
        } else {
            (0, 0)
        };
        let flip = self.config.flip && draw(2) == 1;
        if dy != 0 || dx != 0 || flip {
            scratch.copy_from_slice(image);
            for y in 0..h {
                for x in 0..w {
                    // Output (y, x) reads input (y - dy, x' - dx), x' mirrored.
                    let from_x = if flip { w - 1 - x } else { x } - dx;
                    let from_y = y - dy;
                    let to = ((y * w + x) as usize) * c;
                    let out = &mut image[to..to + c];
                    if (0..h).contains(&from_y) && (0..w).contains(&from_x) {
                        let from = ((from_y * w + from_x) as usize) * c;
                        out.copy_from_slice(&scratch[from..from + c]);
                    } else {
                        out.fill(0.0);
                    }
                }
            }
        }
        if self.config.noise > 0.0 {
            for v in image.iter_mut() {
                *v += self.config.noise * self.rng.next_normal() as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(height: u32, width: u32, scale: f32) -> Pixels {
        Pixels {
            image: ImageConfig {
                height,
                width,
                channels: 1,
                scale,
            },
            classes: 10,
        }
    }

    #[test]
    fn a_line_is_a_class_and_scaled_pixels() {
        let mut batch = Batch::new();
        pixels(2, 2, 16.0)
            .parse_line("7,0,16,8 4", &mut batch)
            .unwrap();
        assert_eq!(batch.labels, [7.0]);
        assert_eq!(batch.dense, [0.0, 1.0, 0.5, 0.25]);
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn bad_lines_say_what_is_wrong_and_leave_the_batch_alone() {
        let p = pixels(2, 2, 1.0);
        let mut batch = Batch::new();
        p.parse_line("1,1,2,3,4", &mut batch).unwrap();
        for (line, message) in [
            ("10,1,2,3,4", "label \"10\" is not a class index in 0..10"),
            ("-1,1,2,3,4", "label \"-1\""),
            ("1.5,1,2,3,4", "label \"1.5\""),
            ("1,1,2,3", "3 pixel values, [data.image] says 2 x 2 x 1 = 4"),
            ("1,1,2,3,4,5", "more than 4 pixel values"),
            ("1,1,x,3,4", "pixel 2 (\"x\") is not a finite number"),
            ("1,1,inf,3,4", "pixel 2"),
            ("", "label \"\""),
        ] {
            let error = p.parse_line(line, &mut batch).unwrap_err();
            assert!(error.contains(message), "{line:?}: {error}");
        }
        assert_eq!(batch.len(), 1);
        assert_eq!(batch.dense, [1.0, 2.0, 3.0, 4.0]);
    }

    fn image_3x3() -> Vec<f32> {
        (1..=9).map(|v| v as f32).collect()
    }

    #[test]
    fn a_shift_moves_the_image_and_fills_zeros() {
        let config = AugmentConfig {
            shift: 1,
            ..AugmentConfig::default()
        };
        let mut augment = Augment::new(config, pixels(3, 3, 1.0).image, 1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut batch = Batch {
                dense: image_3x3(),
                ..Batch::new()
            };
            augment.apply(&mut batch);
            // Every shifted image keeps the centre pixel 5 somewhere and
            // holds only original values or zeros.
            assert!(batch.dense.contains(&5.0), "{:?}", batch.dense);
            assert!(batch.dense.iter().all(|v| (0.0..=9.0).contains(v)));
            seen.insert(batch.dense.iter().map(|v| *v as u8).collect::<Vec<_>>());
        }
        assert_eq!(seen.len(), 9, "all 9 shifts by -1..=1 in each direction");
        assert!(
            seen.contains(&vec![0, 0, 0, 0, 1, 2, 0, 4, 5]),
            "down-right"
        );
    }

    #[test]
    fn a_flip_mirrors_rows_and_the_same_seed_draws_the_same_images() {
        let config = AugmentConfig {
            flip: true,
            noise: 0.1,
            ..AugmentConfig::default()
        };
        let run = |seed| {
            let mut augment = Augment::new(config, pixels(3, 3, 1.0).image, seed);
            let mut batch = Batch {
                dense: [image_3x3(), image_3x3(), image_3x3(), image_3x3()].concat(),
                ..Batch::new()
            };
            augment.apply(&mut batch);
            batch.dense
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        let flipped_or_not: Vec<bool> = run(3)
            .chunks(9)
            .map(|img| (img[0] - 3.0).abs() < 0.5)
            .collect();
        for (img, flipped) in run(3).chunks(9).zip(&flipped_or_not) {
            let first = if *flipped { 3.0 } else { 1.0 };
            assert!((img[0] - first).abs() < 0.5, "{img:?}");
        }
    }
}
