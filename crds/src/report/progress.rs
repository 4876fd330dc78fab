//! What a training run reports: one [`ProgressEvent`] per line of JSON on stdout, and the
//! job status the operator derives from them ([`JobStatus::observe`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::{
    conditions::{
        Condition, ConditionReason, ConditionStatus, ConditionType, JobPhase, set_condition,
    },
    job::{CheckpointRecord, JobStatus},
};

/// How a run ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// `maxSteps` was reached; the final checkpoint is published.
    MaxStepsReached,
    /// Validation loss stopped improving and the overfitting policy is `StopEarly`.
    StoppedEarly,
    /// Stopped by a signal (or `--stop-after`) after a checkpoint; the pod exits 75 and a
    /// new one resumes.
    Interrupted,
}

/// What the overfitting policy did after an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EvalAction {
    /// Nothing (an improvement, patience left, or the policy is `None`).
    None,
    /// The learning rate was multiplied by `overfitting.factor`.
    ReduceLearningRate,
    /// Training stops with the best checkpoint.
    StopEarly,
}

/// The run started (or resumed) at `step`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Started {
    /// The step training continues from (0 for a fresh run).
    pub step: u64,
    /// Training tokens seen before this start.
    pub tokens: u64,
    /// The step the run ends at.
    pub max_steps: u64,
    /// Trainable parameters.
    pub parameters: u64,
    /// All parameters, frozen ones included, when some are frozen (LoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_parameters: Option<u64>,
    /// URI of the checkpoint resumed from; absent for a fresh run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
}

/// One optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepReport {
    /// The optimizer step just taken (1-based).
    pub step: u64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// Throughput of this step.
    pub tokens_per_second: f64,
    /// Model FLOPs utilisation of this step, when the device's peak is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

/// A step whose loss was NaN or infinite; it was skipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NonFiniteLoss {
    /// The step that was skipped.
    pub step: u64,
    /// The loss, as text (`NaN`, `inf`).
    pub value: String,
    /// Non-finite steps in a row so far.
    pub consecutive: u32,
}

/// An evaluation on the train and test splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvalReport {
    /// The step evaluated.
    pub step: u64,
    /// Mean loss on train batches.
    pub train_loss: f64,
    /// Mean loss on test batches.
    pub val_loss: f64,
    /// Lowest validation loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_loss: Option<f64>,
    /// Step of the lowest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// What the overfitting policy did.
    pub action: EvalAction,
}

/// A checkpoint was written completely (its manifest last) and retention applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSaved {
    /// Step of the checkpoint.
    pub step: u64,
    /// Training tokens seen up to it.
    pub tokens: u64,
    /// The checkpoint's folder URI.
    pub uri: String,
    /// Validation loss at that step, if an evaluation ran there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// sha256 (lower-case hex) of the checkpoint's stored `manifest.json`.
    pub sha256: String,
    /// Seconds the upload took (in the background).
    pub seconds: f64,
    /// Seconds training waited for the snapshot.
    pub stall_seconds: f64,
    /// Folder URIs of the checkpoints retention deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
}

/// A finetuning run published its result: the adapter (LoRA) and, with `output.merge`,
/// the merged model, each a folder with its files' sha256 in `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exported {
    /// The training step whose weights were exported (the best checkpoint's).
    pub step: u64,
    /// Folder URI of the adapter (`adapter_model.safetensors`, `adapter_config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_uri: Option<String>,
    /// sha256 of `adapter_model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_sha256: Option<String>,
    /// Folder URI of the whole model (`model.safetensors`, `config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_uri: Option<String>,
    /// sha256 of `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
}

/// The run ended without an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Done {
    /// Why it ended.
    pub reason: Outcome,
    /// The last step taken.
    pub step: u64,
}

/// One line of machine-readable progress, `{"event": "<kind>", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum ProgressEvent {
    /// The run started or resumed.
    Started(Started),
    /// An optimizer step.
    Step(StepReport),
    /// A skipped step with a non-finite loss.
    NonFiniteLoss(NonFiniteLoss),
    /// An evaluation.
    Eval(EvalReport),
    /// A checkpoint was published.
    Checkpoint(CheckpointSaved),
    /// A finetuned model was published.
    Exported(Exported),
    /// The run ended; the last line of a successful run.
    Done(Done),
}

impl ProgressEvent {
    /// The event as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Unreachable for these types; keep the stream parseable regardless.
            format!(r#"{{"event":"error","message":{:?}}}"#, e.to_string())
        })
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl JobStatus {
    /// Fold one progress event into the status. `now` stamps condition transitions and
    /// the completion time. Retained checkpoints follow the trainer's retention: a saved
    /// checkpoint is appended, deleted ones are removed, and the best is the retained one
    /// with the lowest validation loss.
    pub fn observe(&mut self, event: &ProgressEvent, now: &Time) {
        match event {
            ProgressEvent::Started(s) => {
                self.step = Some(signed(s.step));
                self.tokens = Some(signed(s.tokens));
                self.max_steps = Some(signed(s.max_steps));
                self.eta = None;
            }
            ProgressEvent::Step(s) => {
                self.step = Some(signed(s.step));
                self.tokens = Some(signed(s.tokens));
                self.eta = self.max_steps.and_then(|max| eta(s, max, now));
                self.train_loss = Some(s.loss);
                self.learning_rate = Some(s.lr);
                self.tokens_per_second = Some(s.tokens_per_second);
                if s.mfu.is_some() {
                    self.mfu = s.mfu;
                }
            }
            // A FinetuneJob's output URIs live beside the job status (FinetuneJobStatus).
            ProgressEvent::NonFiniteLoss(_) | ProgressEvent::Exported(_) => {}
            ProgressEvent::Eval(e) => {
                self.val_loss = Some(e.val_loss);
                self.best_val_loss = e.best_val_loss.or(self.best_val_loss);
            }
            ProgressEvent::Checkpoint(c) => {
                self.checkpoints.retain(|r| !c.deleted.contains(&r.uri));
                self.checkpoints.retain(|r| r.uri != c.uri);
                self.checkpoints.push(CheckpointRecord {
                    step: signed(c.step),
                    tokens: signed(c.tokens),
                    val_loss: c.val_loss,
                    uri: c.uri.clone(),
                    sha256: c.sha256.clone(),
                });
                self.checkpoints.sort_by_key(|r| r.step);
                self.latest_checkpoint = Some(c.uri.clone());
                self.best_checkpoint = self
                    .checkpoints
                    .iter()
                    .filter_map(|r| r.val_loss.map(|v| (v, r)))
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, r)| r.uri.clone());
            }
            ProgressEvent::Done(d) => {
                self.step = Some(signed(d.step));
                let reason = match d.reason {
                    Outcome::MaxStepsReached => ConditionReason::MaxStepsReached,
                    Outcome::StoppedEarly => ConditionReason::StoppedEarly,
                    // The pod exits 75 and is replaced; the operator decides from the exit.
                    Outcome::Interrupted => return,
                };
                self.phase = JobPhase::Succeeded;
                self.eta = None;
                let message = format!("finished at step {}", d.step);
                for (type_, status) in [
                    (ConditionType::Ready, ConditionStatus::True),
                    (ConditionType::Progressing, ConditionStatus::False),
                ] {
                    set_condition(
                        &mut self.conditions,
                        Condition::new(type_, status, reason, message.clone()),
                        now.clone(),
                    );
                }
                self.completion_time = Some(now.clone());
            }
        }
    }
}

/// When a run at `s`'s step and throughput reaches `max_steps`: every step trains the same
/// number of tokens (`tokens / step`), at `tokensPerSecond`. `None` without a throughput.
fn eta(s: &StepReport, max_steps: i64, now: &Time) -> Option<Time> {
    if s.step == 0 || !(s.tokens_per_second.is_finite() && s.tokens_per_second > 0.0) {
        return None;
    }
    let remaining = (max_steps - signed(s.step)).max(0) as f64;
    let tokens_per_step = s.tokens as f64 / s.step as f64;
    let seconds = remaining * tokens_per_step / s.tokens_per_second;
    let span = k8s_openapi::jiff::SignedDuration::try_from_secs_f64(seconds.round()).ok()?;
    now.0.checked_add(span).ok().map(Time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).expect("time"))
    }

    fn saved(step: u64, val_loss: Option<f64>, deleted: &[u64]) -> ProgressEvent {
        let uri = |s: u64| format!("s3://b/ck/step-{s:09}");
        ProgressEvent::Checkpoint(CheckpointSaved {
            step,
            tokens: step * 100,
            uri: uri(step),
            val_loss,
            sha256: format!("sha-{step}"),
            seconds: 1.0,
            stall_seconds: 0.1,
            deleted: deleted.iter().map(|&s| uri(s)).collect(),
        })
    }

    #[test]
    fn events_have_the_documented_wire_shape() {
        let line = r#"{"event":"step","step":3,"loss":2.5,"lr":0.001,"gradNorm":0.75,"tokens":3072,"tokensPerSecond":1500.0,"seconds":2.0}"#;
        let event: ProgressEvent = serde_json::from_str(line).expect("parse");
        assert!(matches!(&event, ProgressEvent::Step(s) if s.step == 3 && s.mfu.is_none()));
        assert_eq!(
            serde_json::to_value(&event).expect("serialise"),
            serde_json::from_str::<serde_json::Value>(line).expect("json")
        );
        let done: ProgressEvent =
            serde_json::from_str(r#"{"event":"done","reason":"StoppedEarly","step":40}"#)
                .expect("done");
        assert_eq!(
            done,
            ProgressEvent::Done(Done {
                reason: Outcome::StoppedEarly,
                step: 40
            })
        );
        for bad in [
            r#"{"event":"done","reason":"Finished","step":1}"#,
            r#"{"event":"step","step":1}"#,
            r#"{"event":"done","reason":"MaxStepsReached","step":1,"extra":true}"#,
            r#"{"event":"party"}"#,
        ] {
            assert!(serde_json::from_str::<ProgressEvent>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_run_folds_into_the_job_status() {
        let mut st = JobStatus::default();
        let events = [
            ProgressEvent::Started(Started {
                step: 0,
                tokens: 0,
                max_steps: 4,
                parameters: 10,
                total_parameters: None,
                resumed_from: None,
            }),
            ProgressEvent::Step(StepReport {
                step: 1,
                loss: 4.0,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 100,
                tokens_per_second: 50.0,
                mfu: Some(0.3),
                seconds: 2.0,
            }),
            ProgressEvent::Eval(EvalReport {
                step: 1,
                train_loss: 3.9,
                val_loss: 3.0,
                best_val_loss: Some(3.0),
                best_step: Some(1),
                action: EvalAction::None,
            }),
            saved(1, Some(3.0), &[]),
            saved(2, Some(3.5), &[]),
            saved(3, None, &[2]),
            ProgressEvent::Step(StepReport {
                step: 4,
                loss: 3.0,
                lr: 5e-4,
                grad_norm: 0.5,
                tokens: 400,
                tokens_per_second: 60.0,
                mfu: None,
                seconds: 2.0,
            }),
        ];
        for e in &events {
            st.observe(e, &now());
        }
        assert_eq!(st.step, Some(4));
        assert_eq!(st.tokens, Some(400));
        assert_eq!(st.train_loss, Some(3.0));
        assert_eq!(st.learning_rate, Some(5e-4));
        assert_eq!(
            st.mfu,
            Some(0.3),
            "a step without a peak keeps the last MFU"
        );
        assert_eq!(st.val_loss, Some(3.0));
        assert_eq!(st.best_val_loss, Some(3.0));
        let steps: Vec<i64> = st.checkpoints.iter().map(|c| c.step).collect();
        assert_eq!(steps, [1, 3], "retention deleted step 2");
        assert_eq!(
            st.latest_checkpoint.as_deref(),
            Some("s3://b/ck/step-000000003")
        );
        assert_eq!(
            st.best_checkpoint.as_deref(),
            Some("s3://b/ck/step-000000001")
        );
        assert_eq!(st.checkpoints[0].sha256, "sha-1");
        assert_eq!(
            st.phase,
            JobPhase::Pending,
            "the phase is the operator's until done"
        );

        let mut interrupted = st.clone();
        interrupted.observe(
            &ProgressEvent::Done(Done {
                reason: Outcome::Interrupted,
                step: 4,
            }),
            &now(),
        );
        assert_eq!(interrupted.phase, JobPhase::Pending);
        assert_eq!(interrupted.completion_time, None);

        st.observe(
            &ProgressEvent::Done(Done {
                reason: Outcome::MaxStepsReached,
                step: 4,
            }),
            &now(),
        );
        assert_eq!(st.phase, JobPhase::Succeeded);
        assert_eq!(st.completion_time, Some(now()));
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready)
            .expect("Ready");
        assert_eq!(
            (ready.status, ready.reason),
            (ConditionStatus::True, ConditionReason::MaxStepsReached)
        );
    }

    #[test]
    fn the_eta_is_the_remaining_steps_at_the_current_throughput() {
        let mut st = JobStatus::default();
        let step = |step: u64, tokens_per_second: f64| {
            ProgressEvent::Step(StepReport {
                step,
                loss: 3.0,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: step * 100,
                tokens_per_second,
                mfu: None,
                seconds: 2.0,
            })
        };
        // Resumed at step 10 of 100: no estimate before a step's throughput.
        st.observe(
            &ProgressEvent::Started(Started {
                step: 10,
                tokens: 1000,
                max_steps: 100,
                parameters: 10,
                total_parameters: None,
                resumed_from: None,
            }),
            &now(),
        );
        assert_eq!(st.max_steps, Some(100));
        assert_eq!(st.eta, None);
        // 90 steps of 100 tokens at 50 tokens/s: 180 s.
        st.observe(&step(10, 50.0), &now());
        let at = |secs: i64| Some(Time(Timestamp::from_second(1_000 + secs).expect("time")));
        assert_eq!(st.eta, at(180));
        // Faster, later: 60 steps at 200 tokens/s, 30 s.
        st.observe(&step(40, 200.0), &now());
        assert_eq!(st.eta, at(30));
        // No throughput measured: no estimate rather than a wrong one.
        st.observe(&step(41, 0.0), &now());
        assert_eq!(st.eta, None);
        st.observe(&step(42, 100.0), &now());
        assert!(st.eta.is_some());
        st.observe(
            &ProgressEvent::Done(Done {
                reason: Outcome::MaxStepsReached,
                step: 100,
            }),
            &now(),
        );
        assert_eq!(st.eta, None, "a finished run has no estimate");
    }
}
