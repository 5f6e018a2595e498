//! Test support shared by the unit tests (via `#[path]`) and the integration tests: the SFI
//! profile's reference vectors, an image splitter, and fresh images under the vector key.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa};
use flashgate_common::family::Family;
use flashgate_common::licence::{KeyId, Licence, issue_with_ephemeral};
use flashgate_common::sfi::{
    AreaType, FirmwareKey, ImageHeader, ImageNonce, PlainArea, encrypt_area, header_tag, image_to_vec,
};

/// Directory of the reference vectors.
pub const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/spec/vectors/");

/// The profile's reference vectors, decoded.
pub struct Vectors {
    pub vendor_ca: VendorCa,
    pub chip: ChipKey,
    pub certificate: ChipCertificate,
    pub other_chip: ChipKey,
    pub ephemeral: [u8; 32],
    pub key: FirmwareKey,
    pub nonce: ImageNonce,
    pub key_id: KeyId,
    pub licence: Vec<u8>,
    pub image: Vec<u8>,
    pub areas: Vec<PlainArea>,
}

fn hex32(v: &serde_json::Value, field: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(v[field].as_str().unwrap(), &mut out).unwrap();
    out
}

fn bytes(v: &serde_json::Value, field: &str) -> Vec<u8> {
    hex::decode(v[field].as_str().unwrap()).unwrap()
}

/// Load `sfi-profile-v1.json` and `image-v1.sfi`.
pub fn vectors() -> Vectors {
    let text = std::fs::read_to_string(format!("{VECTORS}sfi-profile-v1.json")).unwrap_or_else(|e| {
        panic!("reading the reference vectors in {VECTORS} (../shared/spec/vectors next to the project): {e}")
    });
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let image = std::fs::read(format!("{VECTORS}image-v1.sfi"))
        .unwrap_or_else(|e| panic!("reading {VECTORS}image-v1.sfi: {e}"));
    assert_eq!(image, bytes(&v, "image_sfi"));
    let areas = v["areas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| PlainArea {
            area_type: AreaType::from_byte(a["type"].as_str().unwrap().as_bytes()[0]).unwrap(),
            address: a["address"].as_u64().unwrap() as u32,
            data: bytes(a, "plaintext"),
        })
        .collect();
    Vectors {
        vendor_ca: VendorCa::from_scalar(hex32(&v, "vendor_ca_private_scalar")).unwrap(),
        chip: ChipKey::from_scalar(hex32(&v, "chip_private_scalar")).unwrap(),
        certificate: ChipCertificate::parse(&bytes(&v, "chip_certificate")).unwrap(),
        other_chip: ChipKey::from_scalar(hex32(&v, "other_chip_private_scalar")).unwrap(),
        ephemeral: hex32(&v, "ephemeral_private_scalar"),
        key: FirmwareKey::new(bytes(&v, "firmware_key").try_into().unwrap()),
        nonce: ImageNonce(bytes(&v, "image_nonce").try_into().unwrap()),
        key_id: KeyId(bytes(&v, "key_id").try_into().unwrap()),
        licence: bytes(&v, "licence"),
        image,
        areas,
    }
}

/// An image split into what the host sends: header, then (descriptor, ciphertext) per area.
pub struct SplitImage {
    pub header: Vec<u8>,
    pub areas: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Split an image file (no validation beyond lengths).
pub fn split_image(image: &[u8]) -> SplitImage {
    let header = image[..28].to_vec();
    let count = u16::from_le_bytes([image[10], image[11]]) as usize;
    let mut at = 28;
    let mut areas = Vec::new();
    for _ in 0..count {
        let desc = image[at..at + 30].to_vec();
        let size = u32::from_le_bytes([desc[4], desc[5], desc[6], desc[7]]) as usize;
        at += 30;
        areas.push((desc, image[at..at + size].to_vec()));
        at += size;
    }
    assert_eq!(at, image.len());
    SplitImage { header, areas }
}

/// A fresh image of `areas` under the vector key and nonce, authentic but NOT validated (so
/// tests can make overlapping, misaligned or reserved areas the device must refuse).
pub fn image_of(v: &Vectors, areas: &[PlainArea]) -> Vec<u8> {
    let count = areas.len() as u16;
    let mut header = ImageHeader { version: 1, area_count: count, tag: [0; 16] };
    header.tag = header_tag(&v.key, &v.nonce, &header.aad());
    let mut out = header.to_bytes().to_vec();
    for (i, a) in areas.iter().enumerate() {
        let (desc, ct) = encrypt_area(&v.key, &v.nonce, a.area_type, i as u16 + 1, a.address, count, &a.data).unwrap();
        out.extend_from_slice(&desc.to_bytes());
        out.extend_from_slice(&ct);
    }
    out
}

/// A valid image of `areas` as the packer writes it (validated by `write_image`).
pub fn valid_image_of(v: &Vectors, areas: &[PlainArea]) -> Vec<u8> {
    image_to_vec(&v.key, &v.nonce, areas).unwrap()
}

/// A licence for `cert` under the vector key, nonce and key id.
pub fn licence_for(v: &Vectors, cert: &ChipCertificate) -> Vec<u8> {
    let eph = p256::SecretKey::from_slice(&v.ephemeral).unwrap();
    let l: Licence = issue_with_ephemeral(&eph, cert, &v.key_id, &v.key, &v.nonce).unwrap();
    l.to_bytes().to_vec()
}

/// The whole L4 flash after installing the `F`/`M` areas of `areas` into erased flash.
pub fn expected_flash(areas: &[PlainArea]) -> Vec<u8> {
    let p = Family::Stm32L4.profile();
    let mut flash = vec![0xFF; p.flash_size as usize];
    for a in areas.iter().filter(|a| a.area_type.is_flash()) {
        let start = (a.address - p.flash_base) as usize;
        flash[start..start + a.data.len()].copy_from_slice(&a.data);
    }
    flash
}
