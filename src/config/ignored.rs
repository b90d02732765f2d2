//! Unknown keys, every one of them.
//!
//! serde's `deny_unknown_fields` stops extraction at the first unknown key, so a file with
//! three typos named one. Instead the raw structs accept unknown keys, and extraction runs
//! through [`serde_ignored`], which calls back with the path of every key a struct skips while
//! it goes on; each becomes a problem next to the semantic ones. The structs stay the one list
//! of what is accepted: walking the figment `Value` tree instead would need a second list of
//! keys per struct, kept in step by hand. `serde_ignored` cannot see through internally
//! tagged or untagged enums or `flatten`, so the raw structs use none of them around tables;
//! targets, whose keys depend on their kind, are read in a second step (`raw::targets`).

use serde::{Deserialize, Deserializer};
use serde_ignored::Path;

/// A `T` and the keys it did not take.
pub(super) struct Checked<T> {
    pub value: T,
    pub unknown: Vec<Unknown>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut unknown = Vec::new();
        let value = serde_ignored::deserialize(d, |path| unknown.push(Unknown::from(&path)))?;
        Ok(Checked { value, unknown })
    }
}

/// The path of a key nothing took, from the root of what was deserialized: map keys, and
/// `[i]` for the items of arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Unknown {
    pub path: Vec<String>,
}

impl Unknown {
    /// The key as problems name it: `routes.zentao.rules[0].tagrets`.
    pub fn key(&self) -> String {
        let mut key = String::new();
        for segment in &self.path {
            if !key.is_empty() && !segment.starts_with('[') {
                key.push('.');
            }
            key.push_str(segment);
        }
        key
    }
}

impl From<&Path<'_>> for Unknown {
    fn from(path: &Path<'_>) -> Self {
        fn walk(path: &Path<'_>, out: &mut Vec<String>) {
            match path {
                Path::Root => {}
                Path::Seq { parent, index } => {
                    walk(parent, out);
                    out.push(format!("[{index}]"));
                }
                Path::Map { parent, key } => {
                    walk(parent, out);
                    out.push(key.clone());
                }
                Path::Some { parent }
                | Path::NewtypeStruct { parent }
                | Path::NewtypeVariant { parent } => walk(parent, out),
            }
        }
        let mut out = Vec::new();
        walk(path, &mut out);
        Unknown { path: out }
    }
}
