//! One ONNX network on tract.
//!
//! Where tract can reason about the free input sizes symbolically, one
//! optimized plan serves every shape. DBNet's graph defeats that (it cannot
//! prove that feature maps downsampled and upsampled again line up), so such
//! networks get a plan per input shape, optimized on first use and kept for
//! the shapes seen most recently: photos from one phone share a few sizes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use tract_onnx::prelude::*;

/// An input dimension: fixed by the network, or free per call.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    Fixed(usize),
    Free(&'static str),
}

/// Plans kept for networks that need one per shape.
const PLANS_KEPT: usize = 8;

pub struct Net {
    name: String,
    plans: Plans,
    /// The model's `metadata_props` (PP-OCRv4 keeps its charset there).
    pub metadata: HashMap<String, String>,
}

enum Plans {
    Symbolic(Arc<TypedRunnableModel>),
    PerShape { model: Box<InferenceModel>, recent: RefCell<Vec<([usize; 4], Arc<TypedRunnableModel>)>> },
}

impl Net {
    pub fn load(path: &Path, input: [Dim; 4]) -> Result<Net, String> {
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
        let shape: TVec<TDim> = input
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => TDim::from(*n),
                Dim::Free(s) => model.sym(s).to_dim(),
            })
            .collect();
        let symbolic = model
            .clone()
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable());
        let plans = match symbolic {
            Ok(plan) => Plans::Symbolic(plan),
            Err(e) => {
                tracing::debug!("{name}: one plan per input shape ({e})");
                Plans::PerShape { model: Box::new(model), recent: RefCell::new(Vec::new()) }
            }
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
            Plans::Symbolic(plan) => return Ok(plan.clone()),
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
