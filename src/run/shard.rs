//! Sharded evaluation: shard `i` of `n` takes the cases whose id is `i` modulo `n`, so the shards
//! partition any selection of cases, each shard's cases depend only on their ids (not on the
//! order or the machine), and every shard gets within one case of the same number.

use anyhow::{bail, Context};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    pub fn new(index: usize, count: usize) -> anyhow::Result<Shard> {
        if count == 0 {
            bail!("shard {index}/{count}: the number of shards must be at least 1");
        }
        if index >= count {
            bail!(
                "shard {index}/{count}: shards are numbered from 0 to {}",
                count - 1
            );
        }
        Ok(Shard { index, count })
    }

    /// `i/n`, as `--shard` takes it.
    pub fn parse(spec: &str) -> anyhow::Result<Shard> {
        let (i, n) = Shard::numbers(spec)
            .with_context(|| format!("--shard {spec}: expected i/n, e.g. 0/4"))?;
        Shard::new(i, n).map_err(|e| anyhow::anyhow!("--shard {spec}: {e}"))
    }

    /// The two numbers of `i/n`, unchecked; `None` when `spec` is not of that form.
    pub fn numbers(spec: &str) -> Option<(usize, usize)> {
        let (i, n) = spec.split_once('/')?;
        Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
    }

    /// The shard a scheduler assigned to this process: a Slurm array task
    /// (`SLURM_ARRAY_TASK_ID` counted from `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`)
    /// or, given `shards` (`--shards`, the Job's `completions`), a Kubernetes Indexed Job's
    /// `JOB_COMPLETION_INDEX`. `None` when neither is set.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        shards: Option<usize>,
    ) -> anyhow::Result<Option<Shard>> {
        let read = |name: &str| -> anyhow::Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{name}={v}: expected a whole number")),
            }
        };
        if let Some(k8s_index) = read("JOB_COMPLETION_INDEX")? {
            let Some(count) = shards else {
                bail!(
                    "JOB_COMPLETION_INDEX={k8s_index} is set (a Kubernetes Indexed Job): give \
                     --shards with the Job's completions"
                );
            };
            return Shard::new(k8s_index, count)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("JOB_COMPLETION_INDEX with --shards {count}: {e}"));
        }
        if let Some(task) = read("SLURM_ARRAY_TASK_ID")? {
            let count = read("SLURM_ARRAY_TASK_COUNT")?
                .context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
            let min = read("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            if let Some(step) = read("SLURM_ARRAY_TASK_STEP")? {
                if step != 1 {
                    bail!(
                        "SLURM_ARRAY_TASK_STEP={step}: shards need consecutive array indices \
                         (e.g. --array=0-{})",
                        count.saturating_sub(1)
                    );
                }
            }
            if let Some(n) = shards {
                if n != count {
                    bail!("--shards {n} but the Slurm array has {count} tasks");
                }
            }
            let index = task.checked_sub(min).with_context(|| {
                format!("SLURM_ARRAY_TASK_ID={task} is below SLURM_ARRAY_TASK_MIN={min}")
            })?;
            return Shard::new(index, count).map(Some).map_err(|e| {
                anyhow::anyhow!("Slurm array task {task} (from {min}, {count} tasks): {e}")
            });
        }
        match shards {
            Some(n) => bail!(
                "--shards {n} without a shard index: give --shard i/{n}, or run as a Slurm array \
                 task or a Kubernetes Indexed Job"
            ),
            None => Ok(None),
        }
    }

    pub fn contains(&self, case_id: usize) -> bool {
        case_id % self.count == self.index
    }

    /// `results.jsonl` → `results.shard-0-of-4.jsonl`: each shard writes its own file.
    pub fn file_name(&self, path: &std::path::Path) -> std::path::PathBuf {
        let tag = format!("shard-{}-of-{}", self.index, self.count);
        let name = match (path.file_stem(), path.extension()) {
            (Some(stem), Some(ext)) => {
                format!("{}.{tag}.{}", stem.to_string_lossy(), ext.to_string_lossy())
            }
            _ => format!(
                "{}.{tag}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        };
        path.with_file_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn every_case_falls_in_exactly_one_shard() {
        for count in 1..=7 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            for case in 0..100 {
                let owners = shards.iter().filter(|s| s.contains(case)).count();
                assert_eq!(owners, 1, "case {case} with {count} shards");
            }
        }
    }

    #[test]
    fn shard_sizes_differ_by_at_most_one() {
        let sizes: Vec<usize> = (0..3)
            .map(|i| {
                (0..10)
                    .filter(|&c| Shard { index: i, count: 3 }.contains(c))
                    .count()
            })
            .collect();
        assert_eq!(sizes, vec![4, 3, 3]);
    }

    #[test]
    fn bad_specs_are_refused_with_the_spec_named() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        for bad in ["3/3", "0/0", "1", "a/3", "-1/3", "1/"] {
            let err = Shard::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn slurm_array_indices_count_from_the_arrays_minimum() {
        let got = Shard::from_env(
            env(&[
                ("SLURM_ARRAY_TASK_ID", "5"),
                ("SLURM_ARRAY_TASK_MIN", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(got, Some(Shard { index: 1, count: 3 }));
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert!(Shard::from_env(stepped, None).is_err());
        let disagree = env(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(Shard::from_env(disagree, Some(4)).is_err());
    }

    #[test]
    fn kubernetes_indexed_jobs_need_the_shard_count() {
        let k8s = || env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::from_env(k8s(), Some(4)).unwrap(),
            Some(Shard { index: 2, count: 4 })
        );
        assert!(Shard::from_env(k8s(), None).is_err());
        assert!(Shard::from_env(k8s(), Some(2)).is_err());
        assert_eq!(Shard::from_env(env(&[]), None).unwrap(), None);
        assert!(Shard::from_env(env(&[]), Some(3)).is_err());
    }

    #[test]
    fn each_shard_names_its_own_file() {
        let s = Shard { index: 0, count: 4 };
        assert_eq!(
            s.file_name(std::path::Path::new("/runs/results.jsonl")),
            std::path::Path::new("/runs/results.shard-0-of-4.jsonl")
        );
        assert_eq!(
            s.file_name(std::path::Path::new("out")),
            std::path::Path::new("out.shard-0-of-4")
        );
    }
}
