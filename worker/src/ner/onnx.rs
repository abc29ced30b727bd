//! Just enough of the ONNX format to read a quantized BERT's weights: a minimal
//! protobuf reader for the model's initializers and nodes, and the dequantization
//! of `com.microsoft:MatMulNBits` blocks and `DequantizeLinear` embeddings into
//! plain float tensors named like a Hugging Face checkpoint.

use candle_core::{Device, Tensor};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error("ONNX model: {0}")]
pub struct OnnxError(String);

fn err(msg: impl Into<String>) -> OnnxError {
    OnnxError(msg.into())
}

/// A protobuf message's fields, read lazily.
struct Fields<'a> {
    buf: &'a [u8],
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn varint(buf: &mut &[u8]) -> Result<u64, OnnxError> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or_else(|| err("truncated varint"))?;
        *buf = rest;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(err("varint too long"))
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), OnnxError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let mut read = || -> Result<(u64, Value<'a>), OnnxError> {
            let key = varint(&mut self.buf)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut self.buf)?),
                1 => {
                    self.buf = self.buf.get(8..).ok_or_else(|| err("truncated fixed64"))?;
                    Value::Fixed64
                }
                2 => {
                    let len = varint(&mut self.buf)? as usize;
                    if len > self.buf.len() {
                        return Err(err("truncated field"));
                    }
                    let (bytes, rest) = self.buf.split_at(len);
                    self.buf = rest;
                    Value::Bytes(bytes)
                }
                5 => {
                    let b = self.buf.get(..4).ok_or_else(|| err("truncated fixed32"))?;
                    let v = u32::from_le_bytes(b.try_into().unwrap());
                    self.buf = &self.buf[4..];
                    Value::Fixed32(v)
                }
                w => return Err(err(format!("unsupported wire type {w}"))),
            };
            Ok((key >> 3, value))
        };
        Some(read())
    }
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

fn string(bytes: &[u8]) -> Result<String, OnnxError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| err("a name is not UTF-8"))
}

/// An initializer: raw little-endian data or the typed repeated fields.
pub struct TensorProto {
    pub name: String,
    pub dims: Vec<usize>,
    pub data_type: i32,
    raw: Vec<u8>,
    floats: Vec<f32>,
    ints: Vec<i64>,
}

const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;

impl TensorProto {
    fn parse(buf: &[u8]) -> Result<Self, OnnxError> {
        let mut t =
            TensorProto { name: String::new(), dims: vec![], data_type: 0, raw: vec![], floats: vec![], ints: vec![] };
        for field in fields(buf) {
            match field? {
                (1, Value::Varint(d)) => t.dims.push(d as usize),
                (1, Value::Bytes(mut packed)) => {
                    while !packed.is_empty() {
                        t.dims.push(varint(&mut packed)? as usize);
                    }
                }
                (2, Value::Varint(v)) => t.data_type = v as i32,
                (4, Value::Fixed32(v)) => t.floats.push(f32::from_bits(v)),
                (4, Value::Bytes(packed)) => {
                    t.floats.extend(packed.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())))
                }
                (5, Value::Varint(v)) => t.ints.push(v as i64),
                (5, Value::Bytes(mut packed)) => {
                    while !packed.is_empty() {
                        t.ints.push(varint(&mut packed)? as i64);
                    }
                }
                (8, Value::Bytes(b)) => t.name = string(b)?,
                (9, Value::Bytes(b)) => t.raw = b.to_vec(),
                (14, Value::Varint(1)) => return Err(err("external tensor data is not supported")),
                _ => {}
            }
        }
        Ok(t)
    }

    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn to_f32(&self) -> Result<Vec<f32>, OnnxError> {
        if self.data_type != FLOAT {
            return Err(err(format!("{} is not float", self.name)));
        }
        let v: Vec<f32> = if self.raw.is_empty() {
            self.floats.clone()
        } else {
            self.raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        if v.len() != self.len().max(1) {
            return Err(err(format!("{} has {} values for shape {:?}", self.name, v.len(), self.dims)));
        }
        Ok(v)
    }

    /// Integer tensors (uint8/int8), widened.
    pub fn to_i32(&self) -> Result<Vec<i32>, OnnxError> {
        let v: Vec<i32> = match (self.data_type, self.raw.is_empty()) {
            (UINT8, false) => self.raw.iter().map(|&b| b as i32).collect(),
            (INT8, false) => self.raw.iter().map(|&b| b as i8 as i32).collect(),
            (UINT8 | INT8, true) => self.ints.iter().map(|&i| i as i32).collect(),
            _ => return Err(err(format!("{} is not an 8-bit integer tensor", self.name))),
        };
        if v.len() != self.len().max(1) {
            return Err(err(format!("{} has {} values for shape {:?}", self.name, v.len(), self.dims)));
        }
        Ok(v)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }
}

pub struct NodeProto {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub int_attrs: HashMap<String, i64>,
}

impl NodeProto {
    fn parse(buf: &[u8]) -> Result<Self, OnnxError> {
        let mut n =
            NodeProto { name: String::new(), op_type: String::new(), inputs: vec![], int_attrs: HashMap::new() };
        for field in fields(buf) {
            match field? {
                (1, Value::Bytes(b)) => n.inputs.push(string(b)?),
                (3, Value::Bytes(b)) => n.name = string(b)?,
                (4, Value::Bytes(b)) => n.op_type = string(b)?,
                (5, Value::Bytes(attr)) => {
                    let (mut name, mut int) = (String::new(), None);
                    for f in fields(attr) {
                        match f? {
                            (1, Value::Bytes(b)) => name = string(b)?,
                            (3, Value::Varint(v)) => int = Some(v as i64),
                            _ => {}
                        }
                    }
                    if let Some(v) = int {
                        n.int_attrs.insert(name, v);
                    }
                }
                _ => {}
            }
        }
        Ok(n)
    }

    fn attr(&self, name: &str) -> Result<usize, OnnxError> {
        self.int_attrs
            .get(name)
            .map(|&v| v as usize)
            .ok_or_else(|| err(format!("{}: missing attribute {name}", self.name)))
    }
}

pub struct Graph {
    pub initializers: HashMap<String, TensorProto>,
    pub nodes: Vec<NodeProto>,
}

pub fn read(bytes: &[u8]) -> Result<Graph, OnnxError> {
    let graph = fields(bytes)
        .filter_map(|f| match f {
            Ok((7, Value::Bytes(b))) => Some(Ok(b)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .next()
        .ok_or_else(|| err("no graph in the file"))??;
    let mut g = Graph { initializers: HashMap::new(), nodes: Vec::new() };
    for field in fields(graph) {
        match field? {
            (1, Value::Bytes(b)) => g.nodes.push(NodeProto::parse(b)?),
            (5, Value::Bytes(b)) => {
                let t = TensorProto::parse(b)?;
                g.initializers.insert(t.name.clone(), t);
            }
            _ => {}
        }
    }
    Ok(g)
}

/// `/bert/encoder/layer.0/attention/self/query/MatMul_Q4` → `bert.encoder.layer.0.attention.self.query.weight`.
fn weight_name(node_name: &str) -> Option<String> {
    let path = node_name.trim_start_matches('/');
    let (module, _) = path.rsplit_once('/')?;
    Some(format!("{}.weight", module.replace('/', ".")))
}

/// MatMulNBits B: `[N, blocks, block_size * bits / 8]` packed low nibble first,
/// per-block scales `[N, blocks]`, zero points default to 8 (symmetric).
fn dequantize_nbits(node: &NodeProto, g: &Graph) -> Result<Vec<f32>, OnnxError> {
    let (k, n, bits, block) = (node.attr("K")?, node.attr("N")?, node.attr("bits")?, node.attr("block_size")?);
    if bits != 4 {
        return Err(err(format!("{}: only 4-bit MatMulNBits is supported", node.name)));
    }
    let get = |i: usize| node.inputs.get(i).filter(|s| !s.is_empty()).and_then(|s| g.initializers.get(s));
    let packed = get(1).ok_or_else(|| err(format!("{}: no weights", node.name)))?.bytes();
    let scales = get(2).ok_or_else(|| err(format!("{}: no scales", node.name)))?.to_f32()?;
    let zero_points = get(3).map(|z| z.bytes().to_vec());
    let blocks = k.div_ceil(block);
    let blob = block * bits / 8;
    if packed.len() != n * blocks * blob || scales.len() != n * blocks {
        return Err(err(format!("{}: weight shapes do not match K={k} N={n}", node.name)));
    }
    let mut out = vec![0f32; n * k];
    for row in 0..n {
        for b in 0..blocks {
            let scale = scales[row * blocks + b];
            let zp = match &zero_points {
                // Packed 4-bit zero points, two per byte, per row of blocks.
                Some(z) => {
                    let idx = row * blocks.div_ceil(2) + b / 2;
                    let byte = z[idx];
                    f32::from(if b % 2 == 0 { byte & 0x0f } else { byte >> 4 })
                }
                None => 8.0,
            };
            let data = &packed[(row * blocks + b) * blob..][..blob];
            for (j, &byte) in data.iter().enumerate() {
                for (half, q) in [(0, byte & 0x0f), (1, byte >> 4)] {
                    let col = b * block + 2 * j + half;
                    if col < k {
                        out[row * k + col] = (f32::from(q) - zp) * scale;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Every weight of the graph as a float tensor, under Hugging Face names.
pub fn dequantized_weights(g: &Graph) -> Result<HashMap<String, Tensor>, OnnxError> {
    let cpu = Device::Cpu;
    let tensor = |data: Vec<f32>, dims: &[usize]| Tensor::from_vec(data, dims, &cpu).map_err(|e| err(e.to_string()));
    let mut out = HashMap::new();
    for node in g.nodes.iter().filter(|n| n.op_type == "MatMulNBits") {
        let name =
            weight_name(&node.name).ok_or_else(|| err(format!("cannot name the weights of node {}", node.name)))?;
        let data = dequantize_nbits(node, g)?;
        out.insert(name, tensor(data, &[node.attr("N")?, node.attr("K")?])?);
    }
    for (name, t) in &g.initializers {
        if let Some(base) = name.strip_suffix("_quantized") {
            let q = t.to_i32()?;
            let scale = g
                .initializers
                .get(&format!("{base}_scale"))
                .ok_or_else(|| err(format!("no scale for {name}")))?
                .to_f32()?;
            let zp = match g.initializers.get(&format!("{base}_zero_point")) {
                Some(z) => z.to_i32()?[0] as f32,
                None => 0.0,
            };
            let data = q.iter().map(|&v| (v as f32 - zp) * scale[0]).collect();
            out.insert(base.to_string(), tensor(data, &t.dims)?);
        } else if t.data_type == FLOAT
            && !name.starts_with("onnx::")
            && !name.ends_with("_scale")
            && !name.ends_with("_scales")
            && name.contains('.')
        {
            out.insert(name.clone(), tensor(t.to_f32()?, &t.dims)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_names() {
        let mut buf: &[u8] = &[0xac, 0x02];
        assert_eq!(varint(&mut buf).unwrap(), 300);
        assert_eq!(
            weight_name("/bert/encoder/layer.0/attention/self/query/MatMul_Q4").unwrap(),
            "bert.encoder.layer.0.attention.self.query.weight"
        );
        assert_eq!(weight_name("/classifier/MatMul_Q4").unwrap(), "classifier.weight");
    }

    #[test]
    fn four_bit_blocks_dequantize_low_nibble_first() {
        // K = 4 (one block of 4), N = 1, scale 0.5, symmetric: q - 8.
        let mut attrs = HashMap::new();
        for (k, v) in [("K", 4), ("N", 1), ("bits", 4), ("block_size", 4)] {
            attrs.insert(k.to_string(), v);
        }
        let node = NodeProto {
            name: "/m/MatMul_Q4".into(),
            op_type: "MatMulNBits".into(),
            inputs: vec!["x".into(), "b".into(), "s".into()],
            int_attrs: attrs,
        };
        let b = TensorProto {
            name: "b".into(),
            dims: vec![1, 1, 2],
            data_type: UINT8,
            raw: vec![0x9a, 0x08],
            floats: vec![],
            ints: vec![],
        };
        let s = TensorProto {
            name: "s".into(),
            dims: vec![1, 1],
            data_type: FLOAT,
            raw: vec![],
            floats: vec![0.5],
            ints: vec![],
        };
        let g = Graph { initializers: HashMap::from([("b".into(), b), ("s".into(), s)]), nodes: vec![] };
        assert_eq!(dequantize_nbits(&node, &g).unwrap(), [1.0, 0.5, 0.0, -4.0]);
    }
}
