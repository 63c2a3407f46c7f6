//! Avro single-object encoding (`C3 01` + the schema's 8-byte Rabin fingerprint + the
//! Avro binary datum) for every record on every topic. The schemas are the `.avsc` files
//! under `schemas/`, embedded at build time: they are the single source of truth.
//!
//! Decoding finds the writer's schema by its fingerprint among the schemas this build
//! knows (the current one and any older versions registered with
//! [`Codec::with_previous`]) and resolves it to the current reader schema, so a record
//! written by an older producer still reads after a compatible evolution.

use std::collections::HashMap;
use std::io::Cursor;

use apache_avro::Schema;
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

pub const MARKER: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// One record type's schema with its single-object header.
pub struct Codec {
    name: &'static str,
    schema: Schema,
    header: Vec<u8>,
    writers: HashMap<Vec<u8>, Schema>,
}

impl Codec {
    /// Parses the schema text; panics on a bad schema, which is a build defect caught by
    /// the unit tests (the text is embedded at compile time).
    pub fn new(name: &'static str, schema_json: &str) -> Codec {
        let schema = Schema::parse_str(schema_json)
            .unwrap_or_else(|e| panic!("schema {name} does not parse: {e}"));
        let header = RabinFingerprintHeader::from_schema(&schema).build_header();
        assert_eq!(header.len(), HEADER_LEN);
        let mut writers = HashMap::new();
        writers.insert(header[2..].to_vec(), schema.clone());
        Codec {
            name,
            schema,
            header,
            writers,
        }
    }

    /// Also accept records written with an older version of this schema.
    pub fn with_previous(mut self, schema_json: &str) -> Codec {
        let old = Schema::parse_str(schema_json)
            .unwrap_or_else(|e| panic!("previous schema of {} does not parse: {e}", self.name));
        let header = RabinFingerprintHeader::from_schema(&old).build_header();
        self.writers.insert(header[2..].to_vec(), old);
        self
    }

    /// The 8-byte fingerprint that follows the marker.
    pub fn fingerprint(&self) -> &[u8] {
        &self.header[2..]
    }

    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&self.header);
        apache_avro::write_avro_datum_ref(&self.schema, value, &mut out)
            .map_err(|e| Error::Avro(format!("encoding {}: {e}", self.name)))?;
        Ok(out)
    }

    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        if bytes.len() < HEADER_LEN || bytes[..2] != MARKER {
            return Err(Error::Avro(format!(
                "{}: not an Avro single-object record (no C3 01 marker)",
                self.name
            )));
        }
        let writer = self.writers.get(&bytes[2..HEADER_LEN]).ok_or_else(|| {
            Error::Avro(format!(
                "{}: unknown schema fingerprint {:02x?}",
                self.name,
                &bytes[2..HEADER_LEN]
            ))
        })?;
        let mut cursor = Cursor::new(&bytes[HEADER_LEN..]);
        // Resolution is only needed for a record written with another schema version.
        let reader = (bytes[2..HEADER_LEN] != self.header[2..]).then_some(&self.schema);
        let value = apache_avro::from_avro_datum(writer, &mut cursor, reader)
            .map_err(|e| Error::Avro(format!("decoding {}: {e}", self.name)))?;
        if (cursor.position() as usize) != bytes.len() - HEADER_LEN {
            return Err(Error::Avro(format!(
                "{}: trailing bytes after the record",
                self.name
            )));
        }
        apache_avro::from_value(&value)
            .map_err(|e| Error::Avro(format!("decoding {}: {e}", self.name)))
    }
}
