//! Device choice: `cpu`, `cuda` or `cuda:N`, or the first GPU when there is one. Naming a
//! device that this build or machine does not have is an error, never a silent fallback.

use candle_core::Device;

use crate::job::JobError;

/// The device to train on: the first GPU when built with CUDA and one is present.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// The device named by `spec` (`cpu`, `cuda`, `cuda:N`), or [`default_device`] for `None`.
/// Naming a GPU that this build or machine does not have is an error, never a silent
/// fallback to the CPU.
pub fn select_device(spec: Option<&str>) -> Result<Device, JobError> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(default_device());
    };
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                JobError::Spec(format!("device {spec:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(JobError::Spec(format!(
                "device {spec:?}: expected cpu, cuda or cuda:N"
            )));
        }
    };
    Device::new_cuda(ordinal)
        .map_err(|e| JobError::Spec(format!("device {spec:?} is not available: {e}")))
}
