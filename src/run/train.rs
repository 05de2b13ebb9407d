//! The training loop the hypernetwork editors (MEND, KE, InstructEdit) share: steps of gradient
//! accumulation, validation every `val_interval` steps on held-out records, early stopping that
//! really stops, and the best state kept. What a step computes belongs to the editor being
//! trained ([`Trainee`]); when and how often belongs here.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Validation metrics by name (`loss/total`, `edit/acc`, ...), as EasyEdit's trainer logs them.
pub type Metrics = std::collections::BTreeMap<String, f64>;

/// What the loop needs of an editor under training.
pub trait Trainee {
    /// One micro-batch: forward, loss, backward; gradients accumulate until [`Trainee::update`].
    /// Returns the micro-batch's metrics (its loss at least).
    fn accumulate(&mut self, step: usize) -> Result<Metrics>;
    /// Applies the accumulated gradients (clipping and the optimiser are the trainee's).
    fn update(&mut self) -> Result<()>;
    /// Metrics on the held-out validation records.
    fn validate(&mut self) -> Result<Metrics>;
    /// Keeps the current state as the best so far (in memory or on disk).
    fn keep_best(&mut self, step: usize) -> Result<()>;
    /// Saves everything a resumed run needs to continue as this one would (after each
    /// validation and when the run ends); `progress` and `stopper` are the loop's own state.
    fn checkpoint(&mut self, _progress: &Outcome, _stopper: Option<&EarlyStopping>) -> Result<()> {
        Ok(())
    }
}

/// Whether a validation metric improves upwards or downwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Lower,
    Higher,
}

/// Stops training once `key` has not improved for `patience` validations in a row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub key: String,
    pub patience: usize,
    pub direction: Direction,
    best: Option<f64>,
    since_best: usize,
}

impl EarlyStopping {
    pub fn new(key: impl Into<String>, patience: usize, direction: Direction) -> Self {
        EarlyStopping {
            key: key.into(),
            patience,
            direction,
            best: None,
            since_best: 0,
        }
    }

    /// Takes one validation's metrics; true when they are the best so far.
    ///
    /// # Errors
    /// The metrics lack the key, or its value is not finite (a NaN in training).
    pub fn observe(&mut self, metrics: &Metrics) -> Result<bool> {
        let value = *metrics.get(&self.key).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "early_stop_key {:?} is not among the validation metrics ({})",
                self.key,
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if !value.is_finite() {
            return Err(crate::Error::Invalid(format!(
                "validation {} is {value}: training diverged",
                self.key
            )));
        }
        let better = match (self.best, self.direction) {
            (None, _) => true,
            (Some(best), Direction::Lower) => value < best,
            (Some(best), Direction::Higher) => value > best,
        };
        if better {
            self.best = Some(value);
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        Ok(better)
    }

    pub fn should_stop(&self) -> bool {
        self.since_best >= self.patience
    }

    pub fn best(&self) -> Option<f64> {
        self.best
    }
}

/// When the loop validates and when it ends.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Optimiser updates to run at most.
    pub max_steps: usize,
    /// Micro-batches per update (EasyEdit's gradient accumulation).
    pub accumulate: usize,
    /// Validate every this many updates (and after the last).
    pub val_interval: usize,
    /// Wall-clock budget.
    pub max_time: Option<Duration>,
    /// `None` trains for `max_steps` whatever validation says (EasyEdit's trainer as it runs
    /// since 2024, which never calls its stopper).
    pub early_stopping: Option<EarlyStopping>,
    /// Set (by a Ctrl-C handler) to end the run after the current update, with a checkpoint.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Why training ended, and the validation history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub steps: usize,
    pub stopped_early: bool,
    pub out_of_time: bool,
    /// Ended by [`Schedule::interrupt`].
    #[serde(default)]
    pub interrupted: bool,
    /// `(step, metrics)` of every validation.
    pub history: Vec<(usize, Metrics)>,
    pub best_step: Option<usize>,
}

/// What a training run reports as it goes.
pub trait TrainObserver {
    /// Update `step` is done; `metrics` are its micro-batches' means.
    fn step(&mut self, _step: usize, _metrics: &Metrics) {}
    /// A validation's metrics (progress bars, JSON lines).
    fn validation(&mut self, _step: usize, _metrics: &Metrics) -> Result<()> {
        Ok(())
    }
}

/// An observer that reports nothing.
pub struct Silent;

impl TrainObserver for Silent {}

/// Runs the schedule from `start` (`Outcome::default()`, or a resumed checkpoint's progress, its
/// stopper already in `schedule`), telling `observer` of every update and validation.
pub fn train(
    trainee: &mut dyn Trainee,
    schedule: &mut Schedule,
    start: Outcome,
    observer: &mut dyn TrainObserver,
) -> Result<Outcome> {
    let began = Instant::now();
    let interval = schedule.val_interval.max(1);
    let mut outcome = Outcome {
        stopped_early: false,
        out_of_time: false,
        interrupted: false,
        ..start
    };
    let interrupted = || {
        schedule
            .interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut validate = |trainee: &mut dyn Trainee,
                        observer: &mut dyn TrainObserver,
                        step: usize,
                        outcome: &mut Outcome| {
        let metrics = trainee.validate()?;
        observer.validation(step, &metrics)?;
        let best = match &mut schedule.early_stopping {
            Some(stopper) => stopper.observe(&metrics)?,
            None => true,
        };
        if best {
            trainee.keep_best(step)?;
            outcome.best_step = Some(step);
        }
        outcome.history.push((step, metrics));
        let stop = schedule
            .early_stopping
            .as_ref()
            .is_some_and(EarlyStopping::should_stop);
        outcome.stopped_early = stop;
        trainee.checkpoint(outcome, schedule.early_stopping.as_ref())?;
        Ok::<bool, crate::Error>(stop)
    };
    let mut validated_at = outcome.history.last().map(|(s, _)| *s);
    while outcome.steps < schedule.max_steps {
        if schedule.max_time.is_some_and(|t| began.elapsed() >= t) {
            outcome.out_of_time = true;
            break;
        }
        if interrupted() {
            outcome.interrupted = true;
            break;
        }
        let batches = schedule.accumulate.max(1);
        let mut means = Metrics::new();
        for _ in 0..batches {
            let metrics = trainee.accumulate(outcome.steps)?;
            if let Some((key, v)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
                return Err(crate::Error::Invalid(format!(
                    "step {}: {key} is {v}: training diverged",
                    outcome.steps
                )));
            }
            for (k, v) in metrics {
                *means.entry(k).or_insert(0.0) += v / batches as f64;
            }
        }
        trainee.update()?;
        outcome.steps += 1;
        observer.step(outcome.steps, &means);
        if outcome.steps.is_multiple_of(interval) {
            validated_at = Some(outcome.steps);
            if validate(trainee, observer, outcome.steps, &mut outcome)? {
                return Ok(outcome);
            }
        }
    }
    if outcome.interrupted {
        // No validation: whoever pressed Ctrl-C wants the process back now.
        trainee.checkpoint(&outcome, schedule.early_stopping.as_ref())?;
    } else if validated_at != Some(outcome.steps) {
        validate(trainee, observer, outcome.steps, &mut outcome)?;
    } else if outcome.out_of_time {
        trainee.checkpoint(&outcome, schedule.early_stopping.as_ref())?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(loss: f64) -> Metrics {
        Metrics::from([("loss".to_string(), loss)])
    }

    #[test]
    fn early_stopping_counts_validations_without_improvement() {
        let mut stop = EarlyStopping::new("loss", 2, Direction::Lower);
        assert!(stop.observe(&metrics(3.0)).unwrap());
        assert!(stop.observe(&metrics(2.0)).unwrap());
        assert!(!stop.observe(&metrics(2.5)).unwrap());
        assert!(!stop.should_stop());
        assert!(
            !stop.observe(&metrics(2.0)).unwrap(),
            "equal is no improvement"
        );
        assert!(stop.should_stop());
        assert_eq!(stop.best(), Some(2.0));
        assert!(stop.observe(&metrics(f64::NAN)).is_err());
        let err = stop.observe(&Metrics::new()).unwrap_err().to_string();
        assert!(err.contains("early_stop_key \"loss\""), "{err}");
    }

    /// Gradient descent on `(w - 3)²` with step 0.25 until update 4, then a learning rate that
    /// overshoots: validation improves, then worsens, and the stopper must end the run.
    struct Quadratic {
        w: f64,
        grad: f64,
        updates: usize,
        best: Option<(usize, f64)>,
    }

    impl Quadratic {
        fn at_zero() -> Self {
            Quadratic {
                w: 0.0,
                grad: 0.0,
                updates: 0,
                best: None,
            }
        }
    }

    impl Trainee for Quadratic {
        fn accumulate(&mut self, _step: usize) -> Result<Metrics> {
            self.grad += 2.0 * (self.w - 3.0);
            Ok(metrics((self.w - 3.0).powi(2)))
        }
        fn update(&mut self) -> Result<()> {
            let lr = if self.updates < 4 { 0.25 } else { 1.5 };
            self.w -= lr * self.grad;
            self.grad = 0.0;
            self.updates += 1;
            Ok(())
        }
        fn validate(&mut self) -> Result<Metrics> {
            Ok(metrics((self.w - 3.0).powi(2)))
        }
        fn keep_best(&mut self, step: usize) -> Result<()> {
            self.best = Some((step, self.w));
            Ok(())
        }
    }

    #[test]
    fn the_loop_validates_on_schedule_keeps_the_best_and_stops() {
        let mut q = Quadratic::at_zero();
        let mut schedule = Schedule {
            max_steps: 100,
            accumulate: 1,
            val_interval: 1,
            max_time: None,
            early_stopping: Some(EarlyStopping::new("loss", 2, Direction::Lower)),
            interrupt: None,
        };
        struct Seen(Vec<(usize, f64)>);
        impl TrainObserver for Seen {
            fn validation(&mut self, step: usize, m: &Metrics) -> Result<()> {
                self.0.push((step, m["loss"]));
                Ok(())
            }
        }
        let mut seen = Seen(Vec::new());
        let outcome = train(&mut q, &mut schedule, Outcome::default(), &mut seen).unwrap();
        let seen = seen.0;
        // By hand: w = 1.5, 2.25, 2.625, 2.8125 (losses 2.25, 0.5625, 0.140625, 0.03515625), then
        // lr 1.5 flips the error's sign and doubles it: w = 3.375 (0.140625), 2.25 (0.5625).
        assert_eq!(
            seen,
            [
                (1, 2.25),
                (2, 0.5625),
                (3, 0.140625),
                (4, 0.03515625),
                (5, 0.140625),
                (6, 0.5625)
            ]
        );
        assert!(outcome.stopped_early);
        assert_eq!(outcome.steps, 6);
        assert_eq!(outcome.best_step, Some(4));
        assert_eq!(q.best, Some((4, 2.8125)));

        // Without a stopper the loop runs to max_steps and validates once more at the end.
        let mut q = Quadratic::at_zero();
        let mut schedule = Schedule {
            max_steps: 7,
            accumulate: 2,
            val_interval: 3,
            max_time: None,
            early_stopping: None,
            interrupt: None,
        };
        let outcome = train(&mut q, &mut schedule, Outcome::default(), &mut Silent).unwrap();
        assert_eq!(outcome.steps, 7);
        assert_eq!(
            outcome.history.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [3, 6, 7]
        );
    }
}
