//! Reading JSON documents into typed values, with an error that names the field at fault. Used for
//! request bodies and for stored VM configs alike.

use covm_types::ErrorCode;
use covm_types::{Error, ErrorKind};
use serde::de::DeserializeOwned;

/// Turns a serde error at `path` into a covm error.
pub fn json_error(path: &str, e: &serde_json::Error) -> Error {
    let msg = e.to_string();
    // serde's messages end with " at line L column C"; the path says more to a person.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    let field = |f: &str| {
        if path.is_empty() || path == "." { f.to_owned() } else { format!("{path}.{f}") }
    };
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or_default();
        // serde_path_to_error's path already ends with the unknown field.
        let f = if path == name || path.ends_with(&format!(".{name}")) { path.to_owned() } else { field(name) };
        return Error::new(ErrorKind::InvalidRequest, ErrorCode::UnknownField, format!("unknown field {name}"))
            .with_field(f);
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or_default();
        return Error::new(ErrorKind::InvalidRequest, ErrorCode::MissingField, format!("the field {name} is required"))
            .with_field(field(name));
    }
    let code = if msg.starts_with("a name ") { ErrorCode::InvalidName } else { ErrorCode::InvalidValue };
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            Error::new(ErrorKind::InvalidRequest, ErrorCode::InvalidJson, format!("the body is not valid JSON: {msg}"))
        }
        _ if path.is_empty() || path == "." => Error::new(ErrorKind::InvalidRequest, code, msg),
        _ => Error::new(ErrorKind::InvalidRequest, code, format!("{path}: {msg}")).with_field(path),
    }
}

/// Parses a JSON document into `T`, naming the field at fault.
pub fn json_parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(|e| json_error(&e.path().to_string(), e.inner()))?;
    // One document: anything after it but white space (a second object, stray text) is refused.
    de.end().map_err(|_| {
        Error::new(ErrorKind::InvalidRequest, ErrorCode::InvalidJson, "the body holds more than one JSON document")
    })?;
    Ok(v)
}
