//! One ONNX network on tract.
//!
//! tract runs a plan optimized for concrete shapes many times faster than one
//! with symbolic sizes (the recognizer took 100x longer per line with a
//! symbolic width), and for DBNet it cannot build a symbolic plan at all (it
//! cannot prove that feature maps downsampled and upsampled again line up).
//! So networks whose input size varies get a plan per input shape, optimized
//! on first use (about 0.2 s) and kept for the shapes seen most recently;
//! callers round sizes into a few buckets so that plans are reused.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use tract_onnx::prelude::*;

/// Plans kept per network. Each holds its own packed copy of the weights
/// (up to 16 MB for the recognizer), so this bounds memory too.
const PLANS_KEPT: usize = 16;

pub struct Net {
    name: String,
    plans: Plans,
    /// The model's `metadata_props` (PP-OCRv4 keeps its charset there).
    pub metadata: HashMap<String, String>,
}

enum Plans {
    /// A network with one input shape.
    Fixed([usize; 4], Arc<TypedRunnableModel>),
    PerShape {
        model: Box<InferenceModel>,
        recent: RefCell<Vec<([usize; 4], Arc<TypedRunnableModel>)>>,
    },
}

impl Net {
    /// Loads a network; `fixed` is its only input shape, if it has one.
    pub fn load(path: &Path, fixed: Option<[usize; 4]>) -> Result<Net, String> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let model = tract_onnx::onnx().model_for_path(path).map_err(|e| format!("{name}: {e:#}"))?;
        let metadata = model
            .properties
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("onnx.metadata_props.")?;
                Some((key.to_string(), v.to_plain_array_view::<String>().ok()?.iter().next()?.clone()))
            })
            .collect();
        let plans = match fixed {
            Some(shape) => {
                let plan = model
                    .with_input_fact(0, f32::fact(shape).into())
                    .and_then(|m| m.into_optimized())
                    .and_then(|m| m.into_runnable())
                    .map_err(|e| format!("{name}: {e:#}"))?;
                Plans::Fixed(shape, plan)
            }
            None => Plans::PerShape { model: Box::new(model), recent: RefCell::new(Vec::new()) },
        };
        Ok(Net { name, plans, metadata })
    }

    /// Runs the network on an NCHW batch (`data` in row-major order) and
    /// returns its first output's shape and values.
    pub fn run(&self, shape: [usize; 4], data: Vec<f32>) -> Result<(Vec<usize>, Vec<f32>), String> {
        let fail = |e: TractError| format!("{}: {e:#}", self.name);
        let plan = self.plan_for(shape).map_err(fail)?;
        let input = tract_ndarray::Array4::from_shape_vec(shape, data).map_err(|e| e.to_string())?.into_tensor();
        let outputs = plan.run(tvec!(input.into())).map_err(fail)?;
        let output = outputs.into_iter().next().ok_or("the network gave no output")?;
        let view = output.to_plain_array_view::<f32>().map_err(fail)?;
        Ok((view.shape().to_vec(), view.iter().copied().collect()))
    }

    fn plan_for(&self, shape: [usize; 4]) -> TractResult<Arc<TypedRunnableModel>> {
        let (model, recent) = match &self.plans {
            Plans::Fixed(fixed, plan) if *fixed == shape => return Ok(plan.clone()),
            Plans::Fixed(fixed, _) => return Err(TractError::msg(format!("takes {fixed:?}, not {shape:?}"))),
            Plans::PerShape { model, recent } => (model, recent),
        };
        let mut recent = recent.borrow_mut();
        if let Some(at) = recent.iter().position(|(s, _)| *s == shape) {
            let entry = recent.remove(at);
            let plan = entry.1.clone();
            recent.push(entry);
            return Ok(plan);
        }
        let started = std::time::Instant::now();
        let plan =
            model.as_ref().clone().with_input_fact(0, f32::fact(shape).into())?.into_optimized()?.into_runnable()?;
        tracing::debug!(net = %self.name, ?shape, ms = started.elapsed().as_millis() as u64, "optimized a plan");
        if recent.len() == PLANS_KEPT {
            recent.remove(0);
        }
        recent.push((shape, plan.clone()));
        Ok(plan)
    }
}
