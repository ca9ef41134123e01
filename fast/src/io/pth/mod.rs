//! Read MiniMind's own `.pth` weight files without executing anything.
//!
//! `torch.save` writes a zip archive: `<prefix>/data.pkl` (a protocol-2 pickle of the state dict),
//! `<prefix>/data/<key>` (one raw little-endian storage per key), `<prefix>/byteorder`, ...
//! Each tensor in the pickle is
//! `torch._utils._rebuild_tensor_v2(persistent_load(('storage', torch.HalfStorage, key, location,
//! numel)), offset, size, stride, requires_grad, backward_hooks)`.
//!
//! Python's pickle would import and call whatever globals the file names (`os.system` included).
//! This module runs a restricted pickle machine instead: it knows the handful of opcodes that
//! `torch.save` emits, accepts only an allow-list of globals (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, `torch.*Storage`) and
//! interprets them itself; nothing in the file is ever executed. Any other global is an error that
//! names the file and the global.

mod unpickle;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use unpickle::{TensorRef, Unpickler, Value};

use anyhow::{bail, Context, Result};

/// Element type of a stored tensor (from the pickle's `torch.<X>Storage` global).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PthDtype {
    F16,
    BF16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDtype {
    fn from_storage_name(name: &str) -> Option<PthDtype> {
        Some(match name {
            "HalfStorage" => PthDtype::F16,
            "BFloat16Storage" => PthDtype::BF16,
            "FloatStorage" => PthDtype::F32,
            "DoubleStorage" => PthDtype::F64,
            "LongStorage" => PthDtype::I64,
            "IntStorage" => PthDtype::I32,
            "ShortStorage" => PthDtype::I16,
            "CharStorage" => PthDtype::I8,
            "ByteStorage" => PthDtype::U8,
            "BoolStorage" => PthDtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PthDtype::F64 | PthDtype::I64 => 8,
            PthDtype::F32 | PthDtype::I32 => 4,
            PthDtype::F16 | PthDtype::BF16 | PthDtype::I16 => 2,
            PthDtype::I8 | PthDtype::U8 | PthDtype::Bool => 1,
        }
    }

    /// The matching libtorch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            PthDtype::F16 => tch::Kind::Half,
            PthDtype::BF16 => tch::Kind::BFloat16,
            PthDtype::F32 => tch::Kind::Float,
            PthDtype::F64 => tch::Kind::Double,
            PthDtype::I64 => tch::Kind::Int64,
            PthDtype::I32 => tch::Kind::Int,
            PthDtype::I16 => tch::Kind::Int16,
            PthDtype::I8 => tch::Kind::Int8,
            PthDtype::U8 => tch::Kind::Uint8,
            PthDtype::Bool => tch::Kind::Bool,
        }
    }
}

/// One tensor read from a `.pth`: contiguous little-endian bytes of `shape` in `dtype`.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: PthDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A CPU libtorch tensor holding a copy of the bytes, in the stored dtype.
    pub fn to_tensor(&self) -> Result<tch::Tensor> {
        let size: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        Ok(tch::Tensor::f_from_data_size(
            &self.data,
            &size,
            self.dtype.kind(),
        )?)
    }
}

/// Read every tensor of a `.pth` state dict, in file order.
///
/// Accepts a top-level dict/OrderedDict of name -> tensor, or a MiniMind resume file
/// (`{'model': state_dict, ...}`), whose `model` entry is returned.
pub fn read_pth(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{} is not a zip archive: only the zip format of torch.save (torch >= 1.6) is supported",
            path.display()
        )
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl_name = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .cloned()
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();

    if let Some(order) = read_entry_opt(&mut zip, &format!("{prefix}byteorder"))? {
        let order = String::from_utf8_lossy(&order).trim().to_string();
        if order != "little" {
            bail!(
                "{}: byteorder {order:?}; only little-endian files are supported",
                path.display()
            );
        }
    }

    let pickle = read_entry(&mut zip, &pkl_name)
        .with_context(|| format!("{}: reading {pkl_name}", path.display()))?;
    let root = Unpickler::new(&pickle)
        .run()
        .with_context(|| format!("{}: unpickling {pkl_name}", path.display()))?;

    let entries = state_dict_entries(&root)
        .with_context(|| format!("{}: not a state dict", path.display()))?;

    let mut storages: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let bytes = match storages.get(&t.storage.key) {
            Some(b) => b.clone(),
            None => {
                let entry = format!("{prefix}data/{}", t.storage.key);
                let b =
                    Rc::new(read_entry(&mut zip, &entry).with_context(|| {
                        format!("{}: storage of tensor {name}", path.display())
                    })?);
                storages.insert(t.storage.key.clone(), b.clone());
                b
            }
        };
        let raw = materialise(&name, &t, &bytes).with_context(|| format!("{}", path.display()))?;
        out.push((name, raw));
    }
    Ok(out)
}

fn read_entry_opt(zip: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Result<Option<Vec<u8>>> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("zip entry {name}")),
    };
    let mut buf = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut buf)
        .with_context(|| format!("reading zip entry {name}"))?;
    Ok(Some(buf))
}

fn read_entry(zip: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Result<Vec<u8>> {
    read_entry_opt(zip, name)?.with_context(|| format!("zip entry {name} is missing"))
}

/// Check the tensor's view against its storage and copy its bytes out.
fn materialise(name: &str, t: &TensorRef, storage: &[u8]) -> Result<RawTensor> {
    let es = t.storage.dtype.size();
    if storage.len() != t.storage.numel * es {
        bail!(
            "tensor {name}: storage {} holds {} bytes, expected {} elements of {} bytes",
            t.storage.key,
            storage.len(),
            t.storage.numel,
            es
        );
    }
    if t.size.len() != t.stride.len() {
        bail!(
            "tensor {name}: size {:?} and stride {:?} differ in rank",
            t.size,
            t.stride
        );
    }
    // Contiguous (row-major) strides; dimensions of size 1 may carry any stride.
    let mut expect = 1usize;
    for (d, (&n, &s)) in t.size.iter().zip(&t.stride).enumerate().rev() {
        if n != 1 && s != expect {
            bail!(
                "tensor {name}: non-contiguous layout (size {:?}, stride {:?}, dim {d}); \
                 save it with .contiguous()",
                t.size,
                t.stride
            );
        }
        expect = expect.checked_mul(n).context("tensor size overflows")?;
    }
    let numel = expect;
    let end = t
        .offset
        .checked_add(numel)
        .context("tensor extent overflows")?;
    if end > t.storage.numel {
        bail!(
            "tensor {name}: elements {}..{end} lie outside its storage of {} elements",
            t.offset,
            t.storage.numel
        );
    }
    Ok(RawTensor {
        dtype: t.storage.dtype,
        shape: t.size.clone(),
        data: storage[t.offset * es..end * es].to_vec(),
    })
}

/// The (name, tensor) pairs of the unpickled root.
fn state_dict_entries(root: &Value) -> Result<Vec<(String, TensorRef)>> {
    let Value::Dict(d) = root else {
        bail!(
            "the pickle's root is {}, expected a dict of name -> tensor",
            root.kind()
        );
    };
    let d = d.borrow();
    let all_tensors = d.iter().all(|(_, v)| matches!(v, Value::Tensor(_)));
    if !all_tensors {
        // A MiniMind resume file: {'model': state_dict, 'optimizer': ..., 'step': ...}.
        if let Some((_, inner @ Value::Dict(_))) = d
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == "model"))
        {
            return state_dict_entries(inner).context("in its 'model' entry");
        }
    }
    let mut out = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        let Value::Str(name) = k else {
            bail!("a key is {}, expected a string name", k.kind());
        };
        let Value::Tensor(t) = v else {
            bail!("entry {name} is {}, expected a tensor", v.kind());
        };
        out.push((name.clone(), (**t).clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        // cos\nsystem\n(S'echo pwned'\ntR.
        let p = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwnedq\x00\x85R.";
        let err = Unpickler::new(p).run().unwrap_err();
        assert!(format!("{err:#}").contains("os.system"), "{err:#}");
    }

    #[test]
    fn refuses_unknown_opcode() {
        let err = Unpickler::new(b"\x80\x02\x81.").run().unwrap_err();
        assert!(format!("{err:#}").contains("opcode 0x81"), "{err:#}");
    }

    #[test]
    fn long1_is_signed() {
        let v = Unpickler::new(b"\x8a\x02\xff\xff.").run().unwrap();
        assert!(matches!(v, Value::Int(-1)));
        let v = Unpickler::new(b"\x8a\x05\x00\x00\x00\x00\x01.")
            .run()
            .unwrap();
        assert!(matches!(v, Value::Int(4294967296)));
    }

    #[test]
    fn truncated_pickle_is_an_error() {
        assert!(Unpickler::new(b"\x80\x02X\xff\x00\x00\x00ab")
            .run()
            .is_err());
        assert!(Unpickler::new(b"\x80\x02").run().is_err());
    }
}
