//! Manifest JSON: media types, and which digests a manifest names.
//!
//! Registries store a manifest's bytes as pushed, unknown fields included, and check only the
//! references that its declared media type defines. So what a manifest *says* it references
//! proves nothing by itself: [`verified_references`] returns only what a registry must have
//! checked before it accepted the manifest, the repository's evidence for the cache.

use http::{HeaderMap, header};
use serde_json::Value;

use super::path::Digest;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `mediaType` field of a manifest.
pub(crate) fn media_type(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.get("mediaType")?.as_str().map(str::to_string)
}

/// `type/subtype` of a `Content-Type` value, lower-cased, without parameters.
pub(crate) fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The digests a registry verified exist in the repository before it accepted this manifest,
/// served with `content_type`: `config` and the `layers` without external `urls` of an image
/// manifest, or the `manifests` of an index. Nothing for any other type, nor when the body's
/// own `mediaType` contradicts the one served: the registry checked what *it* thought the
/// manifest was. Never `blobs`, `subject`, `fsLayers` or unknown fields, which registries
/// keep unchecked. Nothing either when an object on the way is [`ambiguous`]: a registry
/// written in Go may have read another field than ours.
pub(crate) fn verified_references(content_type: Option<&str>, bytes: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    if ambiguous(&v) || repeats_keys(bytes) {
        return Vec::new();
    }
    let served = content_type.map(essence);
    let declared = v.get("mediaType").map(|t| t.as_str().map(essence));
    let kind = match (served, declared) {
        (_, Some(None)) => return Vec::new(),
        (Some(s), Some(Some(d))) if s != d => return Vec::new(),
        (Some(t), _) | (None, Some(Some(t))) => t,
        (None, None) => return Vec::new(),
    };
    match kind.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            if v.get("config").is_some_and(ambiguous) || items(&v, "layers").any(ambiguous) {
                return Vec::new();
            }
            let config = v.pointer("/config/digest").into_iter();
            let layers = items(&v, "layers")
                .filter(|layer| is_distributable(layer))
                .filter_map(|layer| layer.get("digest"));
            valid(config.chain(layers))
        }
        OCI_INDEX | DOCKER_LIST => {
            if items(&v, "manifests").any(ambiguous) {
                return Vec::new();
            }
            valid(items(&v, "manifests").filter_map(|m| m.get("digest")))
        }
        _ => Vec::new(),
    }
}

/// The fields evidence is read from, spelled as the specs spell them.
const READ_FIELDS: &[&str] = &[
    "mediaType",
    "config",
    "layers",
    "manifests",
    "digest",
    "urls",
];

/// Go's `encoding/json`, which distribution and most registries use, matches keys to fields
/// case-insensitively (with Unicode folding: `ſ` is `s`, `K` is `k`), the last match
/// winning. So `"layers": [victim], "Layers": [mine]` is verified as mine and read by
/// `serde_json` as the victim's. An object is ambiguous when two of its keys fold alike, or a
/// key folds to a field we read without being spelled so, or a key is not plain ASCII.
fn ambiguous(v: &Value) -> bool {
    let Some(object) = v.as_object() else {
        return false;
    };
    let mut folded: Vec<String> = Vec::with_capacity(object.len());
    for key in object.keys() {
        if !key.is_ascii() {
            return true;
        }
        let fold = key.to_ascii_lowercase();
        let misspelt = READ_FIELDS
            .iter()
            .any(|f| f.to_ascii_lowercase() == fold && f != key);
        if misspelt || folded.contains(&fold) {
            return true;
        }
        folded.push(fold);
    }
    false
}

/// Whether any object in the document repeats a key, or it cannot be read through.
/// `serde_json` keeps the last of two equal keys; Go decodes both into the same field, a
/// repeated array reusing the elements decoded before: `"layers": [{…, "urls": […]}],
/// "layers": [{…}]` is a layer with `urls` to the registry (which then does not check it)
/// and one without to us.
fn repeats_keys(bytes: &[u8]) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
    struct Walk;
    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut keys = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !keys.insert(key) {
                    return Err(A::Error::custom("a repeated key"));
                }
                map.next_value_seed(Walk)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    Walk.deserialize(&mut serde_json::Deserializer::from_slice(bytes))
        .is_err()
}

/// A layer the registry must hold: no external `urls`, and not of a foreign or
/// non-distributable type (clients fetch those elsewhere, so registries do not check them).
fn is_distributable(layer: &Value) -> bool {
    let has_urls = layer
        .get("urls")
        .is_some_and(|u| u.as_array().is_none_or(|a| !a.is_empty()));
    let external_type = layer
        .get("mediaType")
        .and_then(Value::as_str)
        .is_some_and(|t| t.contains("foreign") || t.contains("nondistributable"));
    !has_urls && !external_type
}

/// What an image needs to be pulled whole, for preloading (`ocigate cache warm`): config,
/// layers, artifact blobs and schema 1 `fsLayers`. Not evidence: each is fetched from the
/// repository itself.
pub(crate) fn blob_digests(bytes: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    let config = v.pointer("/config/digest").into_iter();
    let listed = items(&v, "layers")
        .chain(items(&v, "blobs"))
        .filter_map(|item| item.get("digest"));
    let schema1 = items(&v, "fsLayers").filter_map(|l| l.get("blobSum"));
    valid(config.chain(listed).chain(schema1))
}

/// The entries of an index (or manifest list).
pub(crate) fn child_manifests(bytes: &[u8]) -> Vec<Digest> {
    serde_json::from_slice::<Value>(bytes)
        .map(|v| valid(items(&v, "manifests").filter_map(|m| m.get("digest"))))
        .unwrap_or_default()
}

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn valid<'a>(digests: impl Iterator<Item = &'a Value>) -> Vec<Digest> {
    digests
        .filter_map(Value::as_str)
        .filter_map(|d| Digest::parse(d).ok())
        .collect()
}

/// Whether a served `Content-Type` is a signed schema 1 manifest (`…+prettyjws`): its
/// digest is of a payload inside it, not of its bytes.
pub(crate) fn is_signed_schema1(content_type: &str) -> bool {
    essence(content_type).ends_with("+prettyjws")
}

/// Every manifest media type, for fetches of the proxy's own (`ocigate cache warm`).
pub(crate) const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Media types that can select a manifest representation; others in an Accept header are
/// ignored, so clients cannot mint unlimited cache keys.
const MANIFEST_TYPES: &[&str] = &[
    "*/*",
    "application/json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.artifact.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
];

/// The Accept header as a cache key: its manifest media types, without parameters, sorted.
pub(crate) fn accept_key(headers: &HeaderMap) -> String {
    let mut types: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(essence)
        .filter(|t| MANIFEST_TYPES.contains(&t.as_str()))
        .collect();
    types.sort();
    types.dedup();
    types.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn refs(content_type: Option<&str>, v: &Value) -> Vec<String> {
        verified_references(content_type, v.to_string().as_bytes())
            .iter()
            .map(Digest::to_string)
            .collect()
    }

    fn strings(digests: Vec<Digest>) -> Vec<String> {
        digests.iter().map(Digest::to_string).collect()
    }

    #[test]
    fn image_manifests_vouch_for_config_and_local_layers_only() {
        let m = json!({
            "mediaType": OCI_MANIFEST,
            "config": {"digest": d('a')},
            "layers": [
                {"digest": d('b')},
                {"digest": d('c'), "urls": ["https://elsewhere.example/c"]},
                {"digest": d('1'), "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar"},
                {"digest": "not-a-digest"},
            ],
            "blobs": [{"digest": d('d')}],
            "manifests": [{"digest": d('2')}],
            "fsLayers": [{"blobSum": d('e')}],
            "subject": {"digest": d('f')},
            "extra": {"digest": d('3')},
        });
        assert_eq!(refs(Some(OCI_MANIFEST), &m), vec![d('a'), d('b')]);
        assert_eq!(
            refs(None, &m),
            vec![d('a'), d('b')],
            "the body's type alone"
        );
        let mut docker = m.clone();
        docker["mediaType"] = json!(DOCKER_MANIFEST);
        assert_eq!(
            refs(
                Some("Application/vnd.docker.distribution.manifest.v2+json; x=1"),
                &docker
            ),
            vec![d('a'), d('b')]
        );
        // The preload list still has everything an image may need.
        assert_eq!(
            strings(blob_digests(m.to_string().as_bytes())),
            vec![d('a'), d('b'), d('c'), d('1'), d('d'), d('e')]
        );
    }

    #[test]
    fn keys_a_go_registry_reads_otherwise_vouch_for_nothing() {
        let base = || {
            json!({
                "mediaType": OCI_MANIFEST,
                "config": {"digest": d('a')},
                "layers": [{"digest": d('b')}],
            })
        };
        assert_eq!(refs(Some(OCI_MANIFEST), &base()), vec![d('a'), d('b')]);
        let mut variants = Vec::new();
        let mut m = base();
        m["Layers"] = json!([{"digest": d('c')}]);
        variants.push(m);
        let mut m = base();
        m["Config"] = json!({"digest": d('c')});
        variants.push(m);
        let mut m = base();
        m["layers"][0]["Digest"] = json!(d('c'));
        variants.push(m);
        let mut m = base();
        m["layers"][0]["URLs"] = json!(["https://elsewhere.example/"]);
        variants.push(m);
        let mut m = base();
        m["layerſ"] = json!([{"digest": d('c')}]);
        variants.push(m);
        let mut m = base();
        m["config"]["DIGEST"] = json!(d('c'));
        variants.push(m);
        for m in &variants {
            assert!(refs(Some(OCI_MANIFEST), m).is_empty(), "{m}");
        }
        let index = json!({
            "mediaType": OCI_INDEX,
            "manifests": [{"digest": d('a')}],
            "Manifests": [{"digest": d('b')}],
        });
        assert!(refs(Some(OCI_INDEX), &index).is_empty());
        // A repeated key, anywhere: Go merges what serde_json overwrites.
        let b = base();
        let repeated = format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{{"digest":"{}","urls":["https://x.example/"]}}],"layers":{}}}"#,
            b["config"],
            d('c'),
            b["layers"]
        );
        assert!(verified_references(Some(OCI_MANIFEST), repeated.as_bytes()).is_empty());
        let nested = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"x","digest":"y"},"layers":[]}"#;
        assert!(repeats_keys(nested.as_bytes()));
        assert!(!repeats_keys(base().to_string().as_bytes()));
        // Other fields may be spelled as anyone likes.
        let mut m = base();
        m["Annotations"] = json!({"x": "y"});
        assert_eq!(refs(Some(OCI_MANIFEST), &m), vec![d('a'), d('b')]);
    }

    #[test]
    fn indexes_vouch_for_their_manifests_only() {
        let index = json!({
            "mediaType": OCI_INDEX,
            "manifests": [{"digest": d('a')}, {"digest": d('b')}],
            "config": {"digest": d('c')},
            "layers": [{"digest": d('d')}],
        });
        assert_eq!(refs(Some(OCI_INDEX), &index), vec![d('a'), d('b')]);
        let mut list = index.clone();
        list["mediaType"] = json!(DOCKER_LIST);
        assert_eq!(refs(Some(DOCKER_LIST), &list), vec![d('a'), d('b')]);
        assert_eq!(
            strings(child_manifests(index.to_string().as_bytes())),
            vec![d('a'), d('b')]
        );
    }

    #[test]
    fn unknown_contradicting_or_missing_types_vouch_for_nothing() {
        let m = json!({"config": {"digest": d('a')}, "layers": [{"digest": d('b')}]});
        assert!(refs(None, &m).is_empty(), "no type known");
        assert!(refs(Some("application/json"), &m).is_empty());
        assert!(refs(Some("application/vnd.oci.artifact.manifest.v1+json"), &m).is_empty());
        assert!(
            refs(
                Some("application/vnd.docker.distribution.manifest.v1+json"),
                &m
            )
            .is_empty(),
            "schema 1 is not verified the same way"
        );
        let mut typed = m.clone();
        typed["mediaType"] = json!(OCI_INDEX);
        assert!(
            refs(Some(OCI_MANIFEST), &typed).is_empty(),
            "served and declared differ"
        );
        typed["mediaType"] = json!(7);
        assert!(refs(Some(OCI_MANIFEST), &typed).is_empty());
        assert!(verified_references(Some(OCI_MANIFEST), b"{nope").is_empty());
    }

    #[test]
    fn accept_keys_ignore_order_case_and_parameters() {
        let mut a = HeaderMap::new();
        a.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json; q=0.9, application/vnd.docker.distribution.manifest.v2+json"));
        let mut b = HeaderMap::new();
        b.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        b.append(
            header::ACCEPT,
            HeaderValue::from_static("Application/vnd.oci.image.index.v1+json"),
        );
        assert_eq!(accept_key(&a), accept_key(&b));
        assert_eq!(accept_key(&HeaderMap::new()), "");
        let mut c = HeaderMap::new();
        c.append(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/x-made-up-1, application/vnd.oci.image.index.v1+json",
            ),
        );
        assert_eq!(accept_key(&c), "application/vnd.oci.image.index.v1+json");
    }
}
