//! Strict request decoding: a request carrying a field (or enum value) this server does not
//! know is refused with INVALID_ARGUMENT instead of being silently dropped by prost.
//!
//! Why: a client built against a newer API may set a field this server has never heard of
//! and believe it is enforced. prost skips unknown fields and maps unknown enum values to
//! the default, so the gate would decide on less than the caller said. Here every
//! countersign request is walked once against the schema compiled into the binary
//! ([`crate::proto::FILE_DESCRIPTOR_SET`]) before prost decodes it.
//!
//! - [`Schema`] is a compact table built once from that descriptor set: per message, its
//!   declared field numbers and what each may hold.
//! - [`Schema::check`] is the walk: one pass, no allocation unless it rejects, nesting
//!   bounded by [`MAX_DEPTH`]. It is at least as strict as prost, so prost never has to
//!   produce the (less specific) error.
//! - [`StrictCodec`] is the tonic codec every generated countersign service and client
//!   uses (`codec_path` in `build.rs`). Only RPC *input* types are checked: responses read
//!   by this crate's clients stay lenient, so an older client keeps working against a newer
//!   server that added a response field.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::LazyLock;

use prost::bytes::Buf;
use prost::{Message, Name};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// Messages nested deeper than this are refused. Equal to prost's recursion limit (which
/// also counts map entries), so the walk refuses first and says why.
pub const MAX_DEPTH: usize = 100;

/// The largest field number protobuf allows.
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;

/// Longest map key quoted in an error: keys come from the caller and may be huge.
const MAX_QUOTED_KEY_BYTES: usize = 64;

/// Messages whose field numbers all stay below this get a direct lookup table; field lookup
/// was most of the walk's time with a binary search.
const MAX_DIRECT_FIELD_NUMBER: u32 = 256;

/// Path segments shown in an error before the middle is elided (hostile nesting is deep).
const MAX_SHOWN_SEGMENTS: usize = 12;

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const I32: u8 = 5;

// === Schema ===

/// The schema of the API and its imports, built once from the embedded descriptor set.
static SCHEMA: LazyLock<Result<Schema, SchemaError>> = LazyLock::new(|| {
    let set = FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| SchemaError(format!("the embedded descriptor set does not decode: {e}")))?;
    Schema::from_descriptors(&set)
});

/// The schema of everything in `proto/` and its imports.
pub fn schema() -> Result<&'static Schema, &'static SchemaError> {
    SCHEMA.as_ref()
}

/// A descriptor set that cannot be turned into a [`Schema`] (a build problem, not a request
/// problem).
#[derive(Debug, Clone, thiserror::Error)]
#[error("strict decoding has no schema: {0}")]
pub struct SchemaError(String);

/// Known fields per message, indexed by [`MessageId`].
pub struct Schema {
    messages: Vec<MessageSchema>,
    enums: Vec<EnumSchema>,
    by_name: HashMap<Box<str>, MessageId>,
}

/// A message in a [`Schema`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId(usize);

struct MessageSchema {
    full_name: Box<str>,
    /// Sorted by number, for binary search.
    fields: Box<[FieldSchema]>,
    /// `fields` index by field number (`NO_FIELD` where undeclared), if every number is
    /// below [`MAX_DIRECT_FIELD_NUMBER`]; empty otherwise.
    direct: Box<[u16]>,
    /// A synthesized `map<K, V>` entry: errors inside it are reported as `field[key]`.
    map_entry: bool,
    /// The input of some RPC, so decoded strictly.
    request: bool,
}

struct FieldSchema {
    number: u32,
    name: Box<str>,
    repeated: bool,
    kind: Kind,
    /// `kind.wire_type()`, kept at hand for the hot loop.
    wire: u8,
    /// A repeated scalar, so it may also arrive packed.
    packable: bool,
}

/// What a field holds, as far as the wire format is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// int32, int64, uint32, uint64, sint32, sint64, bool.
    Varint,
    Enum(usize),
    /// fixed64, sfixed64, double.
    Fixed64,
    /// fixed32, sfixed32, float.
    Fixed32,
    /// Checked for UTF-8 here so the error has a path; prost would refuse it too.
    String,
    Bytes,
    Message(usize),
    /// proto2 groups: not used by this API, and refused.
    Group,
}

impl Kind {
    fn wire_type(self) -> u8 {
        match self {
            Kind::Varint | Kind::Enum(_) => VARINT,
            Kind::Fixed64 => I64,
            Kind::Fixed32 => I32,
            Kind::String | Kind::Bytes | Kind::Message(_) => LEN,
            Kind::Group => START_GROUP,
        }
    }

    /// Repeated scalars may arrive packed (one length-delimited run) or one by one.
    fn packable(self) -> bool {
        matches!(
            self,
            Kind::Varint | Kind::Enum(_) | Kind::Fixed64 | Kind::Fixed32
        )
    }
}

struct EnumSchema {
    full_name: Box<str>,
    /// Sorted, for binary search.
    values: Box<[i32]>,
}

const NO_FIELD: u16 = u16::MAX;

impl MessageSchema {
    #[inline]
    fn field(&self, number: u32) -> Option<&FieldSchema> {
        if !self.direct.is_empty() {
            let slot = self
                .direct
                .get(number as usize)
                .copied()
                .unwrap_or(NO_FIELD);
            return self.fields.get(usize::from(slot));
        }
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .and_then(|i| self.fields.get(i))
    }
}

impl Schema {
    /// Builds the table; every type a field or RPC names must be in `set`.
    pub fn from_descriptors(set: &FileDescriptorSet) -> Result<Schema, SchemaError> {
        // Pass 1: names to ids, so a field may name a type declared later or elsewhere.
        let mut messages = Vec::new();
        let mut enums = Vec::new();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                collect(package, message, &mut messages, &mut enums);
            }
            for e in &file.enum_type {
                enums.push((qualify(package, e.name()), e));
            }
        }
        let mut by_name = HashMap::with_capacity(messages.len());
        for (i, (name, _)) in messages.iter().enumerate() {
            if by_name
                .insert(name.clone().into_boxed_str(), MessageId(i))
                .is_some()
            {
                return Err(SchemaError(format!("message {name} is declared twice")));
            }
        }
        let enum_ids: HashMap<&str, usize> = enums
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.as_str(), i))
            .collect();

        // Pass 2: fields.
        let mut built = Vec::with_capacity(messages.len());
        for (full_name, message) in &messages {
            let mut fields = message
                .field
                .iter()
                .map(|field| field_schema(full_name, field, &by_name, &enum_ids))
                .collect::<Result<Vec<_>, _>>()?;
            fields.sort_by_key(|f| f.number);
            built.push(MessageSchema {
                full_name: full_name.as_str().into(),
                direct: direct_table(&fields),
                fields: fields.into_boxed_slice(),
                map_entry: message
                    .options
                    .as_ref()
                    .and_then(|o| o.map_entry)
                    .unwrap_or(false),
                request: false,
            });
        }

        // Pass 3: which messages are RPC inputs.
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let id = by_name.get(resolve(method.input_type())).ok_or_else(|| {
                        SchemaError(format!(
                            "{}.{} takes the unknown type {}",
                            service.name(),
                            method.name(),
                            method.input_type()
                        ))
                    })?;
                    if let Some(message) = built.get_mut(id.0) {
                        message.request = true;
                    }
                }
            }
        }

        let enums = enums
            .into_iter()
            .map(|(full_name, e)| {
                let mut values: Vec<i32> = e.value.iter().map(|v| v.number()).collect();
                values.sort_unstable();
                values.dedup();
                EnumSchema {
                    full_name: full_name.into_boxed_str(),
                    values: values.into_boxed_slice(),
                }
            })
            .collect();
        Ok(Schema {
            messages: built,
            enums,
            by_name,
        })
    }

    /// The message with this full name (`countersign.v1.CheckActionRequest`).
    pub fn find(&self, full_name: &str) -> Option<MessageId> {
        self.by_name.get(full_name).copied()
    }

    /// Whether `message` is the input of some RPC, i.e. what a server receives.
    pub fn is_request(&self, message: MessageId) -> bool {
        self.messages.get(message.0).is_some_and(|m| m.request)
    }

    /// Checks that `bytes` is a well-formed encoding of `message` using only declared
    /// fields and enum values. Allocates only to describe a rejection.
    pub fn check(&self, message: MessageId, bytes: &[u8]) -> Result<(), Rejection> {
        self.walk(message.0, bytes, 0)
    }

    fn walk(&self, id: usize, bytes: &[u8], depth: usize) -> Result<(), Rejection> {
        let Some(message) = self.messages.get(id) else {
            return Err(Rejection::new(Problem::Malformed {
                message: format!("message #{id}"),
                field: None,
                detail: "is missing from the schema".into(),
            }));
        };
        let mut reader = Reader::new(bytes);
        while !reader.is_empty() {
            let tag_at = reader.pos;
            let key = reader
                .varint()
                .map_err(|e| Rejection::malformed(message, None, format!("a field tag {e}")))?;
            let number = key >> 3;
            let wire = (key & 7) as u8;
            if number == 0 || number > MAX_FIELD_NUMBER {
                return Err(Rejection::malformed(
                    message,
                    None,
                    format!("field number {number} is outside 1..={MAX_FIELD_NUMBER}"),
                ));
            }
            let number = number as u32;
            let Some(field) = message.field(number) else {
                return Err(Rejection::new(Problem::UnknownField {
                    message: message.full_name.to_string(),
                    number,
                }));
            };
            let packed = wire == LEN && field.packable;
            if wire != field.wire && !packed {
                return Err(Rejection::malformed(
                    message,
                    Some(field),
                    format!(
                        "must be sent as {} but was sent as {}",
                        wire_name(field.wire),
                        wire_name(wire)
                    ),
                ));
            }
            let cut_short = |e: &str| Rejection::malformed(message, Some(field), e.to_string());
            match wire {
                VARINT => {
                    let value = reader.varint().map_err(cut_short)?;
                    if let Kind::Enum(e) = field.kind {
                        self.enum_value(message, field, e, value)?;
                    }
                }
                I64 => {
                    reader.take(8).ok_or_else(|| cut_short("is cut short"))?;
                }
                I32 => {
                    reader.take(4).ok_or_else(|| cut_short("is cut short"))?;
                }
                LEN => {
                    let payload = reader.length_delimited().map_err(cut_short)?;
                    match field.kind {
                        Kind::Message(child) => {
                            if depth >= MAX_DEPTH {
                                return Err(Rejection::new(Problem::TooDeep)
                                    .inside(self.segment(message, field, bytes, tag_at, payload)));
                            }
                            self.walk(child, payload, depth + 1).map_err(|e| {
                                e.inside(self.segment(message, field, bytes, tag_at, payload))
                            })?;
                        }
                        // Most strings are ASCII; checking that first is cheaper.
                        Kind::String
                            if !payload.is_ascii() && std::str::from_utf8(payload).is_err() =>
                        {
                            return Err(cut_short("is not valid UTF-8"));
                        }
                        _ if packed => self.packed(message, field, payload)?,
                        _ => {}
                    }
                }
                // Only a field declared as a group gets here (end-group and the invalid wire
                // types 6 and 7 never match a declared field).
                _ => return Err(cut_short("is a group; groups are not supported")),
            }
        }
        Ok(())
    }

    /// A packed run of scalars: whole elements only, enum values known.
    fn packed(
        &self,
        message: &MessageSchema,
        field: &FieldSchema,
        payload: &[u8],
    ) -> Result<(), Rejection> {
        let whole = |size: usize| {
            if payload.len().is_multiple_of(size) {
                Ok(())
            } else {
                Err(Rejection::malformed(
                    message,
                    Some(field),
                    format!(
                        "is a packed run of {} bytes, not whole {size}-byte values",
                        payload.len()
                    ),
                ))
            }
        };
        match field.kind {
            Kind::Fixed64 => whole(8),
            Kind::Fixed32 => whole(4),
            _ => {
                let mut run = Reader::new(payload);
                while !run.is_empty() {
                    let value = run.varint().map_err(|e| {
                        Rejection::malformed(message, Some(field), format!("packed value {e}"))
                    })?;
                    if let Kind::Enum(e) = field.kind {
                        self.enum_value(message, field, e, value)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Enum values travel as int32 varints (negative ones sign-extended to 64 bits).
    fn enum_value(
        &self,
        message: &MessageSchema,
        field: &FieldSchema,
        id: usize,
        value: u64,
    ) -> Result<(), Rejection> {
        let value = value as i32;
        match self.enums.get(id) {
            Some(e) if e.values.binary_search(&value).is_ok() => Ok(()),
            found => Err(Rejection::new(Problem::UnknownEnumValue {
                message: message.full_name.to_string(),
                field: field.name.to_string(),
                enum_name: found.map_or_else(|| format!("enum #{id}"), |e| e.full_name.to_string()),
                value,
            })),
        }
    }

    /// How a rejection inside `field` is located: `name`, `name[3]` or `name["key"]`.
    /// Only called on the way out of a rejection, so it may scan and allocate.
    #[cold]
    fn segment(
        &self,
        message: &MessageSchema,
        field: &FieldSchema,
        bytes: &[u8],
        tag_at: usize,
        payload: &[u8],
    ) -> Option<String> {
        if message.map_entry {
            // The field holding the entries names it by its key.
            return None;
        }
        if !field.repeated {
            return Some(field.name.to_string());
        }
        let entry = match field.kind {
            Kind::Message(child) => self.messages.get(child).is_some_and(|m| m.map_entry),
            _ => false,
        };
        if entry {
            return Some(format!("{}[{}]", field.name, map_key(payload)));
        }
        let index = occurrences(bytes.get(..tag_at).unwrap_or_default(), field.number);
        Some(format!("{}[{index}]", field.name))
    }
}

/// One declared field: its number, and what the wire may carry for it.
fn field_schema(
    message: &str,
    field: &FieldDescriptorProto,
    messages: &HashMap<Box<str>, MessageId>,
    enums: &HashMap<&str, usize>,
) -> Result<FieldSchema, SchemaError> {
    let name = field.name();
    let declared = Type::try_from(field.r#type.unwrap_or_default())
        .map_err(|_| SchemaError(format!("{message}.{name} has no known type")))?;
    let missing = || {
        SchemaError(format!(
            "{message}.{name} names the unknown type {}",
            field.type_name()
        ))
    };
    let kind = match declared {
        Type::Int32
        | Type::Int64
        | Type::Uint32
        | Type::Uint64
        | Type::Sint32
        | Type::Sint64
        | Type::Bool => Kind::Varint,
        Type::Fixed64 | Type::Sfixed64 | Type::Double => Kind::Fixed64,
        Type::Fixed32 | Type::Sfixed32 | Type::Float => Kind::Fixed32,
        Type::String => Kind::String,
        Type::Bytes => Kind::Bytes,
        Type::Group => Kind::Group,
        Type::Enum => Kind::Enum(*enums.get(resolve(field.type_name())).ok_or_else(missing)?),
        Type::Message => Kind::Message(
            messages
                .get(resolve(field.type_name()))
                .ok_or_else(missing)?
                .0,
        ),
    };
    let number = u32::try_from(field.number())
        .ok()
        .filter(|n| (1..=MAX_FIELD_NUMBER).contains(&u64::from(*n)))
        .ok_or_else(|| {
            SchemaError(format!(
                "{message}.{name} has the invalid number {}",
                field.number()
            ))
        })?;
    let repeated = field.label() == Label::Repeated;
    Ok(FieldSchema {
        number,
        name: name.into(),
        repeated,
        kind,
        wire: kind.wire_type(),
        packable: repeated && kind.packable(),
    })
}

/// Index into `fields` (sorted) by field number, or empty if numbers go too high for that.
fn direct_table(fields: &[FieldSchema]) -> Box<[u16]> {
    let top = fields.last().map_or(0, |f| f.number);
    if top >= MAX_DIRECT_FIELD_NUMBER {
        return Box::default();
    }
    let mut direct = vec![NO_FIELD; top as usize + 1];
    for (i, field) in fields.iter().enumerate() {
        // Fewer than MAX_DIRECT_FIELD_NUMBER fields, so `i` fits.
        if let (Some(slot), Ok(i)) = (direct.get_mut(field.number as usize), u16::try_from(i)) {
            *slot = i;
        }
    }
    direct.into_boxed_slice()
}

/// Registers `message` and its nested types under `scope`.
fn collect<'a>(
    scope: &str,
    message: &'a DescriptorProto,
    messages: &mut Vec<(String, &'a DescriptorProto)>,
    enums: &mut Vec<(String, &'a EnumDescriptorProto)>,
) {
    let full_name = qualify(scope, message.name());
    for nested in &message.nested_type {
        collect(&full_name, nested, messages, enums);
    }
    for e in &message.enum_type {
        enums.push((qualify(&full_name, e.name()), e));
    }
    messages.push((full_name, message));
}

/// Descriptors name types fully qualified, with a leading dot: `.google.protobuf.Struct`.
fn resolve(type_name: &str) -> &str {
    type_name.strip_prefix('.').unwrap_or(type_name)
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

fn wire_name(wire: u8) -> String {
    match wire {
        VARINT => "a varint".into(),
        I64 => "a 64-bit value".into(),
        LEN => "a length-delimited value".into(),
        START_GROUP => "a group start".into(),
        4 => "a group end".into(),
        I32 => "a 32-bit value".into(),
        other => format!("the invalid wire type {other}"),
    }
}

/// A map entry's key for an error path: quoted and shortened if a string.
fn map_key(entry: &[u8]) -> String {
    let mut reader = Reader::new(entry);
    while !reader.is_empty() {
        let Ok(key) = reader.varint() else { break };
        let wire = (key & 7) as u8;
        if key >> 3 == 1 && wire == LEN {
            let Ok(text) = reader.length_delimited() else {
                break;
            };
            let text = String::from_utf8_lossy(text);
            let mut end = text.len().min(MAX_QUOTED_KEY_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let ellipsis = if end < text.len() { "…" } else { "" };
            return format!("{:?}{ellipsis}", &text[..end]);
        }
        if key >> 3 == 1 && wire == VARINT {
            return reader
                .varint()
                .map_or_else(|_| "?".into(), |v| v.to_string());
        }
        if reader.skip(wire).is_err() {
            break;
        }
    }
    "?".into()
}

/// How many times field `number` occurs in `bytes` (already walked, so well-formed).
fn occurrences(bytes: &[u8], number: u32) -> usize {
    let mut reader = Reader::new(bytes);
    let mut count = 0;
    while !reader.is_empty() {
        let Ok(key) = reader.varint() else { break };
        if key >> 3 == u64::from(number) {
            count += 1;
        }
        if reader.skip((key & 7) as u8).is_err() {
            break;
        }
    }
    count
}

// === Reader ===

/// A cursor over wire-format bytes that never reads past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, &'static str> {
        // Tags, lengths and small numbers fit one byte.
        if let Some(&byte) = self.bytes.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err("is cut short");
            };
            self.pos += 1;
            // The tenth byte may only carry the 64th bit (as prost requires).
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("is a varint longer than 64 bits")
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let slice = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }

    fn length_delimited(&mut self) -> Result<&'a [u8], &'static str> {
        let len = self.varint()?;
        usize::try_from(len)
            .ok()
            .and_then(|len| self.take(len))
            .ok_or("says it is longer than the bytes that remain")
    }

    fn skip(&mut self, wire: u8) -> Result<(), &'static str> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop).ok_or("is cut short"),
            I32 => self.take(4).map(drop).ok_or("is cut short"),
            LEN => self.length_delimited().map(drop),
            _ => Err("has an unsupported wire type"),
        }
    }
}

// === Rejection ===

/// Why a request was refused, and where: becomes INVALID_ARGUMENT via [`Rejection::into_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    problem: Problem,
    /// Field path segments, innermost first (pushed while unwinding).
    path: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A field number the message does not declare.
    UnknownField { message: String, number: u32 },
    /// An enum value the enum does not declare.
    UnknownEnumValue {
        message: String,
        field: String,
        enum_name: String,
        value: i32,
    },
    /// Bytes that are not a valid encoding of the message.
    Malformed {
        message: String,
        field: Option<String>,
        detail: String,
    },
    /// Nesting beyond [`MAX_DEPTH`].
    TooDeep,
}

impl Rejection {
    fn new(problem: Problem) -> Self {
        Rejection {
            problem,
            path: Vec::new(),
        }
    }

    #[cold]
    fn malformed(message: &MessageSchema, field: Option<&FieldSchema>, detail: String) -> Self {
        Rejection::new(Problem::Malformed {
            message: message.full_name.to_string(),
            field: field.map(|f| format!("field {} ({})", f.number, f.name)),
            detail,
        })
    }

    #[cold]
    fn inside(mut self, segment: Option<String>) -> Self {
        self.path.extend(segment);
        self
    }

    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// Where the problem is, from the request's top level: `action.parameters.fields["k"]`;
    /// empty at the top level.
    pub fn path(&self) -> String {
        let segments: Vec<&str> = self.path.iter().rev().map(String::as_str).collect();
        if segments.len() <= MAX_SHOWN_SEGMENTS {
            return segments.join(".");
        }
        let head = segments.get(..4).unwrap_or_default().join(".");
        let tail_from = segments.len() - (MAX_SHOWN_SEGMENTS - 4);
        let tail = segments.get(tail_from..).unwrap_or_default().join(".");
        format!("{head}.….{tail}")
    }

    /// The field a `google.rpc.BadRequest` names: an unknown field has no name, so `#17`.
    fn field_path(&self) -> String {
        let path = self.path();
        let leaf = match &self.problem {
            Problem::UnknownField { number, .. } => format!("#{number}"),
            Problem::UnknownEnumValue { field, .. } => field.clone(),
            Problem::Malformed { .. } | Problem::TooDeep => return path,
        };
        if path.is_empty() {
            leaf
        } else {
            format!("{path}.{leaf}")
        }
    }

    /// INVALID_ARGUMENT with the message and a `google.rpc.BadRequest`, like every other
    /// refusal of the API (see `status.rs`).
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        let details = ErrorDetails::with_bad_request_violation(self.field_path(), &message);
        Status::with_error_details(Code::InvalidArgument, message, details)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        let at = if path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("at {path}")
        };
        match &self.problem {
            Problem::UnknownField { message, number } => write!(
                f,
                "request has a field this server does not know: {message} field {number} ({at}); \
                 refusing rather than ignoring it — upgrade the server or remove the field"
            ),
            Problem::UnknownEnumValue {
                message,
                field,
                enum_name,
                value,
            } => write!(
                f,
                "request has a value this server does not know: {message}.{field} is {value}, \
                 which {enum_name} does not declare ({at}); refusing rather than ignoring it — \
                 upgrade the server or send a known value"
            ),
            Problem::Malformed {
                message,
                field: Some(field),
                detail,
            } => write!(
                f,
                "request is not valid protobuf: {message} {field} {detail} ({at})"
            ),
            Problem::Malformed {
                message,
                field: None,
                detail,
            } => write!(
                f,
                "request is not valid protobuf: in {message}, {detail} ({at})"
            ),
            Problem::TooDeep => write!(
                f,
                "request nests messages more than {MAX_DEPTH} levels deep ({at})"
            ),
        }
    }
}

impl std::error::Error for Rejection {}

// === impl StrictCodec ===

/// The codec of every countersign service: prost's, except that an RPC input is checked
/// against the [`Schema`] before prost decodes it.
pub struct StrictCodec<T, U> {
    _types: PhantomData<fn(T) -> U>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        let target = match schema() {
            Err(e) => Target::Unavailable(e.to_string()),
            Ok(schema) => match schema.find(&U::full_name()) {
                Some(id) if schema.is_request(id) => Target::Strict(schema, id),
                Some(_) => Target::Lenient(ProstDecoder::default()),
                None => Target::Unavailable(format!("{} is not in the schema", U::full_name())),
            },
        };
        StrictDecoder { target }
    }
}

/// Decodes one `U`, strictly if `U` is an RPC input.
pub struct StrictDecoder<U> {
    target: Target<U>,
}

enum Target<U> {
    Strict(&'static Schema, MessageId),
    /// A response read by a client: unknown fields are a newer server's business.
    Lenient(ProstDecoder<U>),
    /// Fails closed: a build without a usable schema decodes nothing.
    Unavailable(String),
}

impl<U: Message + Name + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let (schema, id) = match &mut self.target {
            Target::Strict(schema, id) => (*schema, *id),
            Target::Lenient(prost) => return prost.decode(buf),
            Target::Unavailable(why) => return Err(Status::internal(why.clone())),
        };
        let len = buf.remaining();
        let decoded = if buf.chunk().len() == len {
            schema
                .check(id, buf.chunk())
                .map_err(Rejection::into_status)?;
            U::decode(buf)
        } else {
            // tonic hands over one contiguous buffer; copy only if that ever changes.
            let bytes = buf.copy_to_bytes(len);
            schema.check(id, &bytes).map_err(Rejection::into_status)?;
            U::decode(bytes)
        };
        // The walk is at least as strict as prost, so this is a backstop.
        decoded.map(Some).map_err(|e| {
            Status::invalid_argument(format!("request is not a valid {}: {e}", U::full_name()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::value::Kind as ValueKind;
    use prost_types::{
        DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
        FileDescriptorProto, ListValue, MessageOptions, Struct, Timestamp, Value,
    };

    use super::*;
    use crate::proto;

    // --- wire helpers ---

    fn varint(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(value, &mut out);
        out
    }

    fn tag(number: u64, wire: u8) -> Vec<u8> {
        varint((number << 3) | u64::from(wire))
    }

    fn varint_field(number: u64, value: u64) -> Vec<u8> {
        [tag(number, VARINT), varint(value)].concat()
    }

    fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
        [
            tag(number, LEN),
            varint(payload.len() as u64),
            payload.to_vec(),
        ]
        .concat()
    }

    fn strict() -> &'static Schema {
        schema().expect("the embedded schema builds")
    }

    fn check(message: &str, bytes: &[u8]) -> Result<(), Rejection> {
        let schema = strict();
        let id = schema
            .find(message)
            .unwrap_or_else(|| panic!("{message} is in the schema"));
        schema.check(id, bytes)
    }

    fn refused(message: &str, bytes: &[u8]) -> Rejection {
        match check(message, bytes) {
            Ok(()) => panic!("{message} should have been refused"),
            Err(rejection) => rejection,
        }
    }

    fn string(s: &str) -> Value {
        Value {
            kind: Some(ValueKind::StringValue(s.to_string())),
        }
    }

    fn number(n: f64) -> Value {
        Value {
            kind: Some(ValueKind::NumberValue(n)),
        }
    }

    fn action() -> proto::Action {
        let nested = Struct {
            fields: [
                (
                    "enabled".to_string(),
                    Value {
                        kind: Some(ValueKind::BoolValue(true)),
                    },
                ),
                (
                    "nothing".to_string(),
                    Value {
                        kind: Some(ValueKind::NullValue(0)),
                    },
                ),
            ]
            .into(),
        };
        proto::Action {
            r#type: "storage.object.read".to_string(),
            resource: "projects/acme/buckets/invoices/objects/2024/q3/report.pdf".to_string(),
            environment: "production".to_string(),
            parameters: Some(Struct {
                fields: [
                    ("region".to_string(), string("europe-west4")),
                    ("max_bytes".to_string(), number(1_048_576.0)),
                    (
                        "zones".to_string(),
                        Value {
                            kind: Some(ValueKind::ListValue(ListValue {
                                values: vec![string("a"), string("b"), number(3.0)],
                            })),
                        },
                    ),
                    (
                        "options".to_string(),
                        Value {
                            kind: Some(ValueKind::StructValue(nested)),
                        },
                    ),
                ]
                .into(),
            }),
            purpose: "Summarise the quarterly invoices for the finance review the user asked \
                      for, then file the summary in the team's shared drive."
                .to_string(),
        }
    }

    fn task() -> proto::Task {
        proto::Task {
            task_id: "task-7f3a9c".to_string(),
            origin: "slack:#finance".to_string(),
            on_behalf_of: "alice@example.com".to_string(),
            labels: [
                ("team".to_string(), "finance".to_string()),
                ("ticket".to_string(), "FIN-1234".to_string()),
            ]
            .into(),
        }
    }

    /// A typical CheckActionRequest: about 500 bytes with a few parameters.
    fn request() -> proto::CheckActionRequest {
        proto::CheckActionRequest {
            action: Some(action()),
            task: Some(task()),
            idempotency_key: "0190f3e4-7d1c-7a8b-9c2d-3e4f5a6b7c8d".to_string(),
        }
    }

    fn timestamp() -> Option<Timestamp> {
        Some(Timestamp {
            seconds: 1_767_225_600,
            nanos: 123_456_789,
        })
    }

    // --- the embedded schema ---

    #[test]
    fn responses_and_nested_messages_are_not_decoded_strictly() {
        // Every RPC input is: see `every_request_type_is_strict_and_passes_when_fully_populated`.
        let schema = strict();
        for name in [
            "countersign.v1.CheckActionResponse",
            "countersign.v1.StreamPendingResponse",
            "countersign.v1.Action",
            "countersign.v1.Task.LabelsEntry",
            "google.protobuf.Value",
        ] {
            let id = schema.find(name).expect("message is in the schema");
            assert!(!schema.is_request(id), "{name} is not an RPC input");
        }
    }

    #[test]
    fn a_typical_request_passes() {
        let bytes = request().encode_to_vec();
        assert!((400..=700).contains(&bytes.len()), "{} bytes", bytes.len());
        check("countersign.v1.CheckActionRequest", &bytes).expect("a valid request passes");
    }

    /// The name prost generates for `M` and its bytes, as the codec will see them.
    fn named<M: Name>(message: M) -> (String, Vec<u8>) {
        (M::full_name(), message.encode_to_vec())
    }

    #[test]
    fn every_request_type_is_strict_and_passes_when_fully_populated() {
        let cases = [
            named(request()),
            named(proto::AwaitDecisionRequest {
                action_id: "a".into(),
                wait: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 5,
                }),
            }),
            named(proto::CancelActionRequest {
                action_id: "a".into(),
                reason: "r".into(),
            }),
            named(proto::ReportOutcomeRequest {
                action_id: "a".into(),
                outcome: proto::Outcome::Abandoned.into(),
                details: "d".into(),
            }),
            named(proto::StreamPendingRequest {
                after_sequence: u64::MAX,
            }),
            named(proto::SubmitReviewRequest {
                action_id: "a".into(),
                verdict: proto::Verdict::Reject.into(),
                reason: "r".into(),
                action_digest: "d".into(),
            }),
            named(proto::GetActionRequest {
                action_id: "a".into(),
            }),
            named(proto::ListActionsRequest {
                status: proto::ActionStatus::Cancelled.into(),
                requester_id: "r".into(),
                action_type: "t.u".into(),
                page_size: 10,
                page_token: "p".into(),
            }),
            named(proto::ReadEventsRequest {
                after_sequence: 1,
                action_id: "a".into(),
                follow: true,
            }),
            named(proto::VerifyLogRequest {}),
            named(proto::GetPolicySetRequest {}),
            named(proto::ReloadPoliciesRequest {}),
        ];
        let schema = strict();
        for (name, bytes) in cases {
            let id = schema
                .find(&name)
                .unwrap_or_else(|| panic!("{name} is in the schema"));
            assert!(schema.is_request(id), "{name} is decoded strictly");
            schema
                .check(id, &bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The codec also serves this crate's clients; whatever the server sends must pass.
    #[test]
    fn every_response_the_server_produces_passes() {
        let record = proto::ActionRecord {
            action_id: "0190f3e4-7d1c-7a8b-9c2d-3e4f5a6b7c8d".into(),
            status: proto::ActionStatus::Approved.into(),
            on_behalf_of_source: proto::OnBehalfOfSource::Asserted.into(),
            action: Some(action()),
            task: Some(task()),
            requester: Some(proto::Principal {
                id: "iam-bot".into(),
                kind: proto::PrincipalKind::Agent.into(),
                groups: vec!["bots".into(), "iam".into()],
                authenticated_by: "development-header".into(),
            }),
            risk: proto::RiskLevel::Critical.into(),
            matched_rules: vec![proto::MatchedRule {
                name: "iam-admin-grant".into(),
                message: "m".into(),
                effect: proto::PolicyEffect::RequireApproval.into(),
                risk: proto::RiskLevel::High.into(),
            }],
            rule_errors: vec![proto::RuleError {
                rule: "r".into(),
                message: "m".into(),
            }],
            defaulted: true,
            approvals_required: 2,
            reviewer_groups: vec!["security".into()],
            votes: vec![proto::Vote {
                reviewer_id: "bob".into(),
                verdict: proto::Verdict::Approve.into(),
                reason: "ok".into(),
                time: timestamp(),
                sequence: 42,
            }],
            created_at: timestamp(),
            expires_at: timestamp(),
            decided_at: timestamp(),
            valid_until: timestamp(),
            policy_version: "sha256:abc".into(),
            action_digest: "d".repeat(64),
            idempotency_key: "k".into(),
            outcome: Some(proto::OutcomeReport {
                outcome: proto::Outcome::Executed.into(),
                details: "done".into(),
                time: timestamp(),
            }),
            trace_id: "t".into(),
            first_sequence: 1,
            last_sequence: u64::MAX,
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "countersign.v1.CheckActionResponse",
                proto::CheckActionResponse {
                    action_id: "a".into(),
                    status: proto::ActionStatus::Pending.into(),
                    risk: proto::RiskLevel::High.into(),
                    matched_rules: record.matched_rules.clone(),
                    approvals_required: 2,
                    expires_at: timestamp(),
                    policy_version: "v".into(),
                    action_digest: "d".into(),
                    reviewer_groups: vec!["security".into(), "sre".into()],
                    rule_errors: record.rule_errors.clone(),
                    defaulted: true,
                    trace_id: "t".into(),
                    sequence: 7,
                    valid_until: timestamp(),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.GetActionResponse",
                proto::GetActionResponse {
                    action: Some(record.clone()),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.ListActionsResponse",
                proto::ListActionsResponse {
                    actions: vec![record.clone(), record.clone()],
                    next_page_token: "n".into(),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.AwaitDecisionResponse",
                proto::AwaitDecisionResponse {
                    action: Some(record.clone()),
                    is_final: true,
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.StreamPendingResponse",
                proto::StreamPendingResponse {
                    sequence: 3,
                    event: Some(proto::stream_pending_response::Event::VoteAdded(
                        proto::VoteAdded {
                            action_id: "a".into(),
                            vote: record.votes.first().cloned(),
                            approvals_remaining: 1,
                        },
                    )),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.StreamPendingResponse",
                proto::StreamPendingResponse {
                    sequence: 4,
                    event: Some(proto::stream_pending_response::Event::Pending(record)),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.ReadEventsResponse",
                proto::ReadEventsResponse {
                    event: Some(proto::Event {
                        sequence: 1,
                        kind: "action.requested".into(),
                        time: timestamp(),
                        actor: "a".into(),
                        action_id: "i".into(),
                        payload_json: "{}".into(),
                        prev_hash: "p".into(),
                        hash: "h".into(),
                    }),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.VerifyLogResponse",
                proto::VerifyLogResponse {
                    ok: false,
                    events_checked: 10,
                    first_bad_sequence: 4,
                    problem: "p".into(),
                    head_sequence: 10,
                    head_hash: "h".into(),
                }
                .encode_to_vec(),
            ),
            (
                "countersign.v1.GetPolicySetResponse",
                proto::GetPolicySetResponse {
                    policy_version: "v".into(),
                    rule_count: 3,
                    rule_names: vec!["a".into(), "b".into()],
                }
                .encode_to_vec(),
            ),
        ];
        for (name, bytes) in cases {
            check(name, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    // --- unknown fields ---

    #[test]
    fn an_unknown_top_level_field_is_refused() {
        let bytes = [request().encode_to_vec(), varint_field(17, 1)].concat();
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert_eq!(
            rejection.problem(),
            &Problem::UnknownField {
                message: "countersign.v1.CheckActionRequest".into(),
                number: 17
            }
        );
        assert_eq!(
            rejection.to_string(),
            "request has a field this server does not know: countersign.v1.CheckActionRequest \
             field 17 (at the top level); refusing rather than ignoring it — upgrade the server \
             or remove the field"
        );
    }

    #[test]
    fn an_unknown_field_inside_action_is_refused() {
        let action = [action().encode_to_vec(), len_field(17, b"strict")].concat();
        let bytes = [len_field(1, &action), len_field(2, &task().encode_to_vec())].concat();
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert_eq!(
            rejection.to_string(),
            "request has a field this server does not know: countersign.v1.Action field 17 \
             (at action); refusing rather than ignoring it — upgrade the server or remove the \
             field"
        );
        assert_eq!(rejection.path(), "action");
    }

    #[test]
    fn an_unknown_field_inside_task_and_its_labels_is_refused() {
        let task_bytes = [task().encode_to_vec(), varint_field(9, 1)].concat();
        let bytes = len_field(2, &task_bytes);
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert!(
            rejection
                .to_string()
                .contains("countersign.v1.Task field 9 (at task)"),
            "{rejection}"
        );

        let entry = [
            len_field(1, b"team"),
            len_field(2, b"finance"),
            varint_field(3, 1),
        ]
        .concat();
        let bytes = len_field(2, &len_field(4, &entry));
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert!(
            rejection
                .to_string()
                .contains("countersign.v1.Task.LabelsEntry field 3 (at task.labels[\"team\"])"),
            "{rejection}"
        );
    }

    /// `action.parameters` → Struct → `fields["region"]` → Value with an unknown field 9.
    fn parameters_request(value: &[u8]) -> Vec<u8> {
        let entry = [len_field(1, b"region"), len_field(2, value)].concat();
        let parameters = len_field(1, &entry);
        let action = [
            len_field(1, b"storage.object.read"),
            len_field(4, &parameters),
        ]
        .concat();
        len_field(1, &action)
    }

    #[test]
    fn an_unknown_field_inside_a_parameter_value_is_refused() {
        let value = [string("europe-west4").encode_to_vec(), varint_field(9, 1)].concat();
        let rejection = refused(
            "countersign.v1.CheckActionRequest",
            &parameters_request(&value),
        );
        assert!(
            rejection.to_string().contains(
                "google.protobuf.Value field 9 (at action.parameters.fields[\"region\"])"
            ),
            "{rejection}"
        );
        assert_eq!(
            rejection.field_path(),
            "action.parameters.fields[\"region\"].#9"
        );
    }

    #[test]
    fn an_unknown_field_deep_in_a_list_is_located_by_index() {
        let bad = [string("c").encode_to_vec(), varint_field(12, 0)].concat();
        let list = [
            len_field(1, &string("a").encode_to_vec()),
            len_field(1, &number(2.0).encode_to_vec()),
            len_field(1, &bad),
        ]
        .concat();
        let value = len_field(6, &list);
        let rejection = refused(
            "countersign.v1.CheckActionRequest",
            &parameters_request(&value),
        );
        assert_eq!(
            rejection.path(),
            "action.parameters.fields[\"region\"].list_value.values[2]"
        );
        assert!(matches!(
            rejection.problem(),
            Problem::UnknownField { number: 12, .. }
        ));
    }

    #[test]
    fn unknown_fields_inside_timestamp_and_duration_are_refused() {
        let wait = [
            prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }
            .encode_to_vec(),
            varint_field(3, 1),
        ]
        .concat();
        let bytes = [len_field(1, b"id"), len_field(2, &wait)].concat();
        let rejection = refused("countersign.v1.AwaitDecisionRequest", &bytes);
        assert!(
            rejection
                .to_string()
                .contains("google.protobuf.Duration field 3 (at wait)"),
            "{rejection}"
        );

        // No request holds a Timestamp yet; the walk is the same for any message.
        let time = [
            timestamp().unwrap_or_default().encode_to_vec(),
            varint_field(3, 1),
        ]
        .concat();
        let vote = [len_field(1, b"bob"), len_field(4, &time)].concat();
        let rejection = refused("countersign.v1.Vote", &vote);
        assert!(
            rejection
                .to_string()
                .contains("google.protobuf.Timestamp field 3 (at time)"),
            "{rejection}"
        );
    }

    #[test]
    fn an_unknown_enum_value_is_refused() {
        let with_verdict = |verdict: u64| [len_field(1, b"id"), varint_field(2, verdict)].concat();
        check("countersign.v1.SubmitReviewRequest", &with_verdict(2)).expect("REJECT is known");
        let rejection = refused("countersign.v1.SubmitReviewRequest", &with_verdict(7));
        assert_eq!(
            rejection.to_string(),
            "request has a value this server does not know: \
             countersign.v1.SubmitReviewRequest.verdict is 7, which countersign.v1.Verdict does \
             not declare (at the top level); refusing rather than ignoring it — upgrade the \
             server or send a known value"
        );
        // Negative values arrive sign-extended to ten bytes.
        let rejection = refused(
            "countersign.v1.SubmitReviewRequest",
            &with_verdict(-1i64 as u64),
        );
        assert!(matches!(
            rejection.problem(),
            Problem::UnknownEnumValue { value: -1, .. }
        ));
        // `google.protobuf.NullValue` has only NULL_VALUE = 0.
        let rejection = refused(
            "countersign.v1.CheckActionRequest",
            &parameters_request(&varint_field(1, 1)),
        );
        assert!(rejection.to_string().contains("google.protobuf.NullValue"));
    }

    // --- malformed bytes ---

    #[test]
    fn a_wire_type_that_contradicts_the_schema_is_refused() {
        let bytes = len_field(1, &varint_field(1, 5));
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert_eq!(
            rejection.to_string(),
            "request is not valid protobuf: countersign.v1.Action field 1 (type) must be sent \
             as a length-delimited value but was sent as a varint (at action)"
        );
    }

    #[test]
    fn groups_invalid_wire_types_and_field_zero_are_refused() {
        for (bytes, expected) in [
            (tag(1, 3), "sent as a group start"),
            (tag(1, 4), "sent as a group end"),
            (tag(1, 6), "the invalid wire type 6"),
            (tag(3, 7), "the invalid wire type 7"),
            (varint_field(0, 1), "field number 0 is outside"),
            (tag(1 << 29, VARINT), "is outside 1..=536870911"),
            (
                vec![0xff; 11],
                "a field tag is a varint longer than 64 bits",
            ),
        ] {
            let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
            assert!(
                rejection.to_string().contains(expected),
                "{bytes:?}: {rejection}"
            );
        }
    }

    #[test]
    fn truncated_buffers_are_refused_without_panicking() {
        let bytes = request().encode_to_vec();
        for end in 0..bytes.len() {
            let prefix = &bytes[..end];
            let walked = check("countersign.v1.CheckActionRequest", prefix);
            if walked.is_ok() {
                // A cut on a field boundary is a valid (smaller) message.
                proto::CheckActionRequest::decode(prefix).expect("prost agrees");
            }
        }
        let rejection = refused(
            "countersign.v1.CheckActionRequest",
            &[tag(1, LEN), varint(100), vec![0; 3]].concat(),
        );
        assert!(
            rejection
                .to_string()
                .contains("field 1 (action) says it is longer than the bytes that remain"),
            "{rejection}"
        );
        let rejection = refused(
            "countersign.v1.CheckActionRequest",
            &[tag(3, LEN), vec![0x80]].concat(),
        );
        assert!(
            rejection.to_string().contains("is cut short"),
            "{rejection}"
        );
    }

    #[test]
    fn invalid_utf8_in_a_string_is_refused() {
        let bytes = len_field(1, &len_field(1, &[b'a', 0xff, b'b']));
        let rejection = refused("countersign.v1.CheckActionRequest", &bytes);
        assert_eq!(
            rejection.to_string(),
            "request is not valid protobuf: countersign.v1.Action field 1 (type) is not valid \
             UTF-8 (at action)"
        );
    }

    /// Parameters holding a list in a list … `lists` deep; each list adds two messages.
    fn nested_lists(lists: usize) -> Vec<u8> {
        let mut value = Value {
            kind: Some(ValueKind::NullValue(0)),
        }
        .encode_to_vec();
        for _ in 0..lists {
            value = len_field(6, &len_field(1, &value));
        }
        parameters_request(&value)
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_like_prost_does() {
        // Messages: Action, Struct, entry, Value, then a ListValue and a Value per list.
        let depth_of = |lists: usize| 4 + 2 * lists;
        for lists in 40..60 {
            let bytes = nested_lists(lists);
            let walked = check("countersign.v1.CheckActionRequest", &bytes);
            let decoded = proto::CheckActionRequest::decode(bytes.as_slice());
            assert_eq!(
                walked.is_ok(),
                decoded.is_ok(),
                "{lists} lists: walk {walked:?}, prost {decoded:?}"
            );
            assert_eq!(walked.is_ok(), depth_of(lists) <= MAX_DEPTH);
        }
        let rejection = refused("countersign.v1.CheckActionRequest", &nested_lists(5_000));
        assert_eq!(rejection.problem(), &Problem::TooDeep);
        assert!(
            rejection.to_string().starts_with(
                "request nests messages more than 100 levels deep (at action.parameters.fields[\"region\"].list_value.…."
            ),
            "{rejection}"
        );
    }

    #[test]
    fn random_mutations_never_panic_and_never_pass_what_prost_refuses() {
        // xorshift64*: deterministic, no dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let valid = request().encode_to_vec();
        let (mut passed, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let mut bytes = valid.clone();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % (bytes.len() + 1);
                match next() % 6 {
                    0 if at < bytes.len() => bytes[at] ^= 1 << (next() % 8),
                    1 if at < bytes.len() => bytes[at] = next() as u8,
                    2 => bytes.insert(at, next() as u8),
                    3 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    4 => bytes.truncate(at),
                    _ => {
                        let field = varint_field(next() % 40, next() % 300);
                        bytes.splice(at..at, field);
                    }
                }
            }
            match check("countersign.v1.CheckActionRequest", &bytes) {
                Ok(()) => {
                    passed += 1;
                    if let Err(e) = proto::CheckActionRequest::decode(bytes.as_slice()) {
                        panic!("walk passed what prost refuses ({e}): {bytes:?}");
                    }
                }
                Err(rejection) => {
                    refused += 1;
                    let status = rejection.into_status();
                    assert_eq!(status.code(), Code::InvalidArgument);
                    assert!(!status.message().is_empty());
                }
            }
        }
        assert!(
            passed > 100 && refused > 100,
            "{passed} passed, {refused} refused"
        );
    }

    #[test]
    fn a_rejection_is_invalid_argument_with_a_bad_request() {
        let bytes = [request().encode_to_vec(), varint_field(17, 1)].concat();
        let status = refused("countersign.v1.CheckActionRequest", &bytes).into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad_request = status
            .get_details_bad_request()
            .expect("carries a BadRequest");
        let violation = bad_request.field_violations.first().expect("one violation");
        assert_eq!(violation.field, "#17");
        assert_eq!(violation.description, status.message());
    }

    // --- every wire type, on a schema made for the purpose ---

    #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, prost::Enumeration)]
    #[repr(i32)]
    enum Colour {
        Red = 0,
        Green = 1,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Inner {
        #[prost(string, tag = "1")]
        name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct AllTypes {
        #[prost(int64, tag = "1")]
        int64: i64,
        #[prost(fixed64, tag = "2")]
        fixed64: u64,
        #[prost(string, tag = "3")]
        string: String,
        #[prost(fixed32, tag = "5")]
        fixed32: u32,
        #[prost(sint32, tag = "6")]
        sint32: i32,
        #[prost(bytes = "vec", tag = "7")]
        bytes: Vec<u8>,
        #[prost(message, optional, tag = "8")]
        inner: Option<Inner>,
        #[prost(enumeration = "Colour", tag = "9")]
        colour: i32,
        #[prost(int32, repeated, tag = "10")]
        packed: Vec<i32>,
        #[prost(fixed32, repeated, packed = "false", tag = "11")]
        unpacked: Vec<u32>,
        #[prost(double, repeated, tag = "12")]
        doubles: Vec<f64>,
        #[prost(map = "string, int32", tag = "13")]
        map: HashMap<String, i32>,
        #[prost(bool, tag = "14")]
        flag: bool,
        #[prost(float, tag = "15")]
        float: f32,
        #[prost(enumeration = "Colour", repeated, tag = "16")]
        colours: Vec<i32>,
    }

    fn field(name: &str, number: i32, ty: Type, repeated: bool) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(
                if repeated {
                    Label::Repeated
                } else {
                    Label::Optional
                }
                .into(),
            ),
            r#type: Some(ty.into()),
            ..Default::default()
        }
    }

    fn typed(mut field: FieldDescriptorProto, type_name: &str) -> FieldDescriptorProto {
        field.type_name = Some(type_name.into());
        field
    }

    fn all_types_schema() -> Schema {
        let map_entry = DescriptorProto {
            name: Some("MapEntry".into()),
            field: vec![
                field("key", 1, Type::String, false),
                field("value", 2, Type::Int32, false),
            ],
            options: Some(MessageOptions {
                map_entry: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let all_types = DescriptorProto {
            name: Some("AllTypes".into()),
            field: vec![
                field("int64", 1, Type::Int64, false),
                field("fixed64", 2, Type::Fixed64, false),
                field("string", 3, Type::String, false),
                field("fixed32", 5, Type::Fixed32, false),
                field("sint32", 6, Type::Sint32, false),
                field("bytes", 7, Type::Bytes, false),
                typed(field("inner", 8, Type::Message, false), ".t.Inner"),
                typed(field("colour", 9, Type::Enum, false), ".t.Colour"),
                field("packed", 10, Type::Int32, true),
                field("unpacked", 11, Type::Fixed32, true),
                field("doubles", 12, Type::Double, true),
                typed(
                    field("map", 13, Type::Message, true),
                    ".t.AllTypes.MapEntry",
                ),
                field("flag", 14, Type::Bool, false),
                field("float", 15, Type::Float, false),
                typed(field("colours", 16, Type::Enum, true), ".t.Colour"),
                // Declared but never sent by prost: groups are refused.
                typed(field("legacy", 17, Type::Group, false), ".t.Inner"),
            ],
            nested_type: vec![map_entry],
            ..Default::default()
        };
        let inner = DescriptorProto {
            name: Some("Inner".into()),
            field: vec![field("name", 1, Type::String, false)],
            ..Default::default()
        };
        let colour = EnumDescriptorProto {
            name: Some("Colour".into()),
            value: ["RED", "GREEN"]
                .iter()
                .zip(0..)
                .map(|(name, number)| EnumValueDescriptorProto {
                    name: Some((*name).into()),
                    number: Some(number),
                    options: None,
                })
                .collect(),
            ..Default::default()
        };
        let file = FileDescriptorProto {
            name: Some("t.proto".into()),
            package: Some("t".into()),
            message_type: vec![all_types, inner],
            enum_type: vec![colour],
            ..Default::default()
        };
        Schema::from_descriptors(&FileDescriptorSet { file: vec![file] }).expect("schema builds")
    }

    #[test]
    fn known_fields_of_every_wire_type_pass() {
        let schema = all_types_schema();
        let id = schema.find("t.AllTypes").expect("declared");
        let message = AllTypes {
            int64: -5,
            fixed64: u64::MAX,
            string: "ünïcødé".into(),
            fixed32: 7,
            sint32: -9,
            bytes: vec![0, 0xff, 0x80],
            inner: Some(Inner { name: "n".into() }),
            colour: Colour::Green.into(),
            packed: vec![1, -1, 300],
            unpacked: vec![1, 2, 3],
            doubles: vec![0.5, -1.0],
            map: [("k".to_string(), 1), ("".to_string(), -1)].into(),
            flag: true,
            float: 1.5,
            colours: vec![Colour::Red.into(), Colour::Green.into()],
        };
        let bytes = message.encode_to_vec();
        schema.check(id, &bytes).expect("every wire type passes");

        // Repeated scalars may come unpacked too; both encodings are valid protobuf.
        let unpacked = [
            varint_field(10, 1),
            varint_field(10, 2),
            varint_field(16, 1),
        ]
        .concat();
        schema.check(id, &unpacked).expect("unpacked varints pass");
        let packed_fixed = len_field(11, &[0u8; 8]);
        schema
            .check(id, &packed_fixed)
            .expect("packed fixed32 passes");
    }

    #[test]
    fn malformed_scalars_of_every_wire_type_are_refused() {
        let schema = all_types_schema();
        let id = schema.find("t.AllTypes").expect("declared");
        for (bytes, expected) in [
            (
                [tag(2, I64), vec![0; 7]].concat(),
                "field 2 (fixed64) is cut short",
            ),
            (
                [tag(5, I32), vec![0; 3]].concat(),
                "field 5 (fixed32) is cut short",
            ),
            (
                [tag(5, I64), vec![0; 8]].concat(),
                "must be sent as a 32-bit value",
            ),
            (len_field(11, &[0; 5]), "not whole 4-byte values"),
            (len_field(12, &[0; 9]), "not whole 8-byte values"),
            (len_field(10, &[0x80]), "packed value is cut short"),
            (len_field(16, &[5]), "t.AllTypes.colours is 5"),
            (varint_field(9, 2), "which t.Colour does not declare"),
            (len_field(13, &varint_field(2, 1 << 40)), ""),
            (
                len_field(13, &varint_field(3, 1)),
                "t.AllTypes.MapEntry field 3 (at map[?])",
            ),
            (tag(1, START_GROUP), "must be sent as a varint"),
            (
                tag(17, START_GROUP),
                "field 17 (legacy) is a group; groups are not supported",
            ),
            (
                tag(17, LEN),
                "must be sent as a group start but was sent as a length-delimited",
            ),
        ] {
            match schema.check(id, &bytes) {
                // An int32 map value wider than 32 bits is truncated by every decoder, as
                // for any int32; it is not a refusal.
                Ok(()) if expected.is_empty() => {}
                Ok(()) => panic!("{bytes:?} should be refused ({expected})"),
                Err(rejection) => assert!(
                    !expected.is_empty() && rejection.to_string().contains(expected),
                    "{bytes:?}: {rejection}"
                ),
            }
        }
    }

    #[test]
    fn a_descriptor_naming_an_unknown_type_does_not_build() {
        let file = FileDescriptorProto {
            name: Some("t.proto".into()),
            package: Some("t".into()),
            message_type: vec![DescriptorProto {
                name: Some("M".into()),
                field: vec![typed(field("m", 1, Type::Message, false), ".t.Missing")],
                ..Default::default()
            }],
            ..Default::default()
        };
        let error = Schema::from_descriptors(&FileDescriptorSet { file: vec![file] })
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .contains("t.M.m names the unknown type .t.Missing")
        );
    }
}
