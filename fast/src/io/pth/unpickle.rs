//! The restricted pickle machine: the opcodes `torch.save` emits and an allow-list of globals,
//! interpreted here (nothing in the file is ever executed).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use anyhow::{bail, Context, Result};

use super::PthDtype;

/// The only globals a file may name.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(PthDtype),
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", s) if PthDtype::from_storage_name(s).is_some() => {
            Ok(Global::Storage(PthDtype::from_storage_name(s).unwrap()))
        }
        _ => bail!(
            "refusing pickle global `{module}.{name}`: only collections.OrderedDict, \
             torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and torch.*Storage \
             are allowed (this loader never executes code from a weights file)"
        ),
    }
}

#[derive(Clone, Debug)]
pub(super) struct StorageRef {
    pub(super) dtype: PthDtype,
    pub(super) key: String,
    pub(super) numel: usize,
}

#[derive(Clone, Debug)]
pub(super) struct TensorRef {
    pub(super) storage: StorageRef,
    pub(super) offset: usize,
    pub(super) size: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

pub(super) type Shared<T> = Rc<RefCell<T>>;

#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    #[allow(dead_code)]
    Bool(bool),
    Int(i64),
    #[allow(dead_code)] // read by Debug only: optimizer hyper-parameters in resume files
    Float(f64),
    Str(String),
    #[allow(dead_code)]
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Shared<Vec<Value>>),
    /// dict and OrderedDict alike; insertion order is kept.
    Dict(Shared<Vec<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Limits that keep a hostile file from exhausting memory through the machine itself.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;

pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Positions in `stack` where MARKs were pushed.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).context("length overflow")?;
        if end > self.data.len() {
            bail!("truncated pickle: need {n} bytes at offset {}", self.pos);
        }
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("unterminated text line in pickle")?;
        let s = std::str::from_utf8(&rest[..nl]).context("GLOBAL name is not UTF-8")?;
        self.pos += nl + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        Ok(std::str::from_utf8(self.take(n)?)
            .context("string is not UTF-8")?
            .to_string())
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            bail!("pickle stack exceeds {MAX_STACK} entries");
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("pickle stack underflow at offset {}", self.pos);
        }
        Ok(self.stack.pop().unwrap())
    }
    fn top(&self) -> Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("pickle stack underflow at offset {}", self.pos);
        }
        Ok(self.stack.last().unwrap())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .context("pickle pops to a MARK that was never pushed")?;
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, k: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            bail!("pickle memo exceeds {MAX_MEMO} entries");
        }
        let v = self.top()?.clone();
        self.memo.insert(k, v);
        Ok(())
    }
    fn memo_get(&mut self, k: u32) -> Result<()> {
        let v = self
            .memo
            .get(&k)
            .with_context(|| format!("pickle memo key {k} is unset"))?
            .clone();
        self.push(v)
    }

    pub(super) fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        bail!("pickle protocol {p} is not supported");
                    }
                }
                0x95 => {
                    // FRAME: framing is only an I/O hint.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        bail!("LONG1 of {n} bytes at offset {at} does not fit in 64 bits");
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).context("string too long")?;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b')' => self.push(Value::Tuple(Rc::new(Vec::new())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85 => {
                    let a = self.pop()?;
                    self.push(Value::Tuple(Rc::new(vec![a])))?
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(Rc::new(vec![a, b])))?
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(Rc::new(vec![a, b, c])))?
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let Value::List(l) = self.top()? else {
                        bail!("APPEND at offset {at} to {}, not a list", self.top()?);
                    };
                    l.borrow_mut().push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let Value::List(l) = self.top()? else {
                        bail!("APPENDS at offset {at} to {}, not a list", self.top()?);
                    };
                    l.borrow_mut().extend(items);
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items, at)?;
                    self.push(Value::Dict(Rc::new(RefCell::new(d))))?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let Value::Dict(d) = self.top()? else {
                        bail!("SETITEM at offset {at} on {}, not a dict", self.top()?);
                    };
                    dict_set(&mut d.borrow_mut(), k, v);
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let Value::Dict(d) = self.top()? else {
                        bail!("SETITEMS at offset {at} on {}, not a dict", self.top()?);
                    };
                    let mut d = d.borrow_mut();
                    for (k, v) in pairs(items, at)? {
                        dict_set(&mut d, k, v);
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    // MEMOIZE
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = resolve_global(module, name)?;
                    self.push(Value::Global(g))?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        bail!("STACK_GLOBAL at offset {at} with non-string module/name");
                    };
                    let g = resolve_global(module, name)?;
                    self.push(Value::Global(g))?
                }
                b'Q' => {
                    // BINPERSID: torch's persistent_load, the only "call" a storage needs.
                    let pid = self.pop()?;
                    let s = persistent_load(&pid)
                        .with_context(|| format!("BINPERSID at offset {at}"))?;
                    self.push(Value::Storage(Rc::new(s)))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v =
                        reduce(&func, &args).with_context(|| format!("REDUCE at offset {at}"))?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: OrderedDict state (state_dict's `_metadata`) is ignored; nothing else
                    // we can build takes state.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => bail!("BUILD at offset {at} on {other}"),
                    }
                }
                _ => bail!(
                    "unsupported pickle opcode 0x{op:02x} ({:?}) at offset {at}; \
                     this loader only knows what torch.save writes",
                    op as char
                ),
            }
        }
    }
}

fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        bail!("odd number of items for a dict at offset {at}");
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn dict_set(d: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    if let Some(slot) = d.iter_mut().find(|(key, _)| same_key(key, &k)) {
        slot.1 = v;
    } else {
        d.push((k, v));
    }
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => bail!("{what} is {other}, expected a non-negative int"),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| as_usize(x, what)).collect(),
        Value::List(l) => l.borrow().iter().map(|x| as_usize(x, what)).collect(),
        other => bail!("{what} is {other}, expected a tuple of ints"),
    }
}

/// `('storage', torch.HalfStorage, key, location, numel)` -> a reference to `data/<key>`.
fn persistent_load(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple(t) = pid else {
        bail!("persistent id is {pid}, expected a tuple");
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, numel]
            if tag == "storage" =>
        {
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("storage key {key:?} is not a plain name");
            }
            Ok(StorageRef {
                dtype: *dtype,
                key: key.clone(),
                numel: as_usize(numel, "storage numel")?,
            })
        }
        _ => bail!("persistent id is not ('storage', torch.<X>Storage, key, location, numel)"),
    }
}

/// Apply one of the allow-listed callables to its arguments.
fn reduce(func: &Value, args: &Value) -> Result<Value> {
    let Value::Global(g) = func else {
        bail!("calling {func}, only allow-listed globals can be called");
    };
    let Value::Tuple(args) = args else {
        bail!("arguments are {args}, expected a tuple");
    };
    match g {
        Global::OrderedDict => {
            if !args.is_empty() {
                bail!("OrderedDict called with arguments");
            }
            Ok(Value::Dict(Rc::new(RefCell::new(Vec::new()))))
        }
        Global::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 {
                bail!(
                    "_rebuild_tensor_v2 takes at least 4 arguments, got {}",
                    args.len()
                );
            }
            let Value::Storage(s) = &args[0] else {
                bail!(
                    "_rebuild_tensor_v2's first argument is {}, expected a storage",
                    args[0]
                );
            };
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: (**s).clone(),
                offset: as_usize(&args[1], "storage offset")?,
                size: as_usizes(&args[2], "size")?,
                stride: as_usizes(&args[3], "stride")?,
            })))
        }
        Global::RebuildParameter => {
            // (data, requires_grad, backward_hooks): a Parameter is its data.
            match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => bail!("_rebuild_parameter without a tensor"),
            }
        }
        Global::Storage(_) => bail!("a storage type is only valid inside a persistent id"),
    }
}
