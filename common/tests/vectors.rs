//! The reference vectors of the Flashgate SFI profile v1 (`shared/spec/vectors/`): every value of
//! `sfi-profile-v1.json` and `image-v1.sfi` is reproduced or accepted here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use flashgate_common::cert::{CertError, ChipCertificate, ChipKey, VendorCa, VendorCaPublicKey};
use flashgate_common::family::Family;
use flashgate_common::licence::{
    InvalidLicence, KeyId, Licence, LicenceError, derive_kek, issue_with_ephemeral, licence_context, open_licence,
};
use flashgate_common::sfi::{
    self, AreaType, EncryptedArea, FirmwareKey, ImageNonce, ImageReader, PlainArea, ReaderOptions, SfiError,
};
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/spec/vectors/");

struct Vectors {
    json: Value,
    image: Vec<u8>,
}

impl Vectors {
    fn load() -> Self {
        let text = std::fs::read_to_string(format!("{VECTORS}sfi-profile-v1.json")).unwrap_or_else(|e| {
            panic!("reading the reference vectors in {VECTORS} (../shared/spec/vectors next to the project): {e}")
        });
        let image = std::fs::read(format!("{VECTORS}image-v1.sfi"))
            .unwrap_or_else(|e| panic!("reading {VECTORS}image-v1.sfi: {e}"));
        Self { json: serde_json::from_str(&text).unwrap(), image }
    }

    fn hex(&self, name: &str) -> Vec<u8> {
        hex::decode(self.json[name].as_str().unwrap_or_else(|| panic!("vector {name} missing"))).unwrap()
    }

    fn arr<const N: usize>(&self, name: &str) -> [u8; N] {
        self.hex(name).try_into().unwrap_or_else(|v: Vec<u8>| panic!("{name}: {} bytes, want {N}", v.len()))
    }

    fn key(&self) -> FirmwareKey {
        FirmwareKey::new(self.arr("firmware_key"))
    }

    fn nonce(&self) -> ImageNonce {
        ImageNonce(self.arr("image_nonce"))
    }

    fn product_id(&self) -> [u8; 8] {
        self.json["product_id_ascii"].as_str().unwrap().as_bytes().try_into().unwrap()
    }

    fn areas(&self) -> Vec<PlainArea> {
        self.json["areas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| PlainArea {
                area_type: AreaType::from_byte(a["type"].as_str().unwrap().as_bytes()[0]).unwrap(),
                address: u32::try_from(a["address"].as_u64().unwrap()).unwrap(),
                data: hex::decode(a["plaintext"].as_str().unwrap()).unwrap(),
            })
            .collect()
    }

    fn cert(&self) -> ChipCertificate {
        ChipCertificate::parse(&self.hex("chip_certificate")).unwrap()
    }
}

#[test]
fn image_hex_in_json_equals_the_file() {
    let v = Vectors::load();
    assert_eq!(v.hex("image_sfi"), v.image);
    assert_eq!(v.image.len(), 3134);
}

#[test]
fn image_decrypts_to_the_plaintext_areas() {
    let v = Vectors::load();
    let areas = sfi::decrypt_image(&v.key(), &v.nonce(), &v.image, Some(Family::Stm32L4.profile())).unwrap();
    assert_eq!(areas, v.areas());
    // Areas are numbered from 1 in the IV: index 1 is the first area (proved by the vector).
    let mut reader = ImageReader::new(v.image.as_slice(), ReaderOptions::default()).unwrap();
    let first = reader.next_area().unwrap().unwrap();
    assert_eq!(first.descriptor.index, 1);
    assert_eq!(first.offset, 28);
    // The same ciphertext under the IV of index 0 does not authenticate.
    let iv0 = sfi::area_iv(&v.nonce(), 0);
    assert_ne!(iv0, sfi::area_iv(&v.nonce(), 1));
    let mut dec = flashgate_common::gcm::GcmDecryptor::new(&v.key(), &iv0, &first.descriptor.aad());
    let mut ct = first.ciphertext.clone();
    dec.update(&mut ct);
    assert!(!dec.finish(&first.descriptor.tag));
}

#[test]
fn reencrypting_the_areas_reproduces_the_image() {
    let v = Vectors::load();
    let image = sfi::image_to_vec(&v.key(), &v.nonce(), &v.areas()).unwrap();
    assert_eq!(image, v.image);
    let mut out = Vec::new();
    let n = sfi::write_image(&v.key(), &v.nonce(), &v.areas(), &mut out).unwrap();
    assert_eq!(n, 3134);
    assert_eq!(out, v.image);
}

#[test]
fn header_tag_and_streaming_area_decryption() {
    let v = Vectors::load();
    let mut reader = ImageReader::new(v.image.as_slice(), ReaderOptions::default()).unwrap();
    sfi::verify_header(&v.key(), &v.nonce(), reader.header()).unwrap();
    assert!(matches!(
        sfi::verify_header(&FirmwareKey::new([0; 16]), &v.nonce(), reader.header()),
        Err(SfiError::HeaderNotAuthentic)
    ));
    let expected = v.areas();
    let mut i = 0;
    while let Some(area) = reader.next_area().unwrap() {
        // Streaming GCM in odd-sized chunks, as the device does.
        let iv = sfi::area_iv(&v.nonce(), area.descriptor.index);
        let mut dec = flashgate_common::gcm::GcmDecryptor::new(&v.key(), &iv, &area.descriptor.aad());
        let mut data = area.ciphertext.clone();
        for chunk in data.chunks_mut(7) {
            dec.update(chunk);
        }
        assert!(dec.finish(&area.descriptor.tag));
        assert_eq!(data, expected[i].data);
        i += 1;
    }
    assert_eq!(i, 3);
}

/// Fully process an image: parse every structure, verify the header tag and every area tag.
/// Decryption is a pure function of (key, nonce, descriptor, ciphertext), so an area byte-identical
/// to the authentic area at the same position is known to verify and is not decrypted again: this
/// is a full verification of the flipped image at a fraction of the cost.
fn verify_image(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    image: &[u8],
    authentic: &[EncryptedArea],
) -> Result<(), SfiError> {
    let opts = ReaderOptions { file_len: Some(image.len() as u64), memory_map: None };
    let mut reader = ImageReader::new(image, opts)?;
    sfi::verify_header(key, nonce, reader.header())?;
    let mut position = 0;
    while let Some(area) = reader.next_area()? {
        if authentic.get(position) != Some(&area) {
            area.decrypt(key, nonce)?;
        }
        position += 1;
    }
    Ok(())
}

#[test]
fn every_single_bit_flip_of_the_image_is_detected() {
    let v = Vectors::load();
    let (key, nonce) = (v.key(), v.nonce());
    let mut reader = ImageReader::new(v.image.as_slice(), ReaderOptions::default()).unwrap();
    let mut authentic = Vec::new();
    while let Some(area) = reader.next_area().unwrap() {
        authentic.push(area);
    }
    verify_image(&key, &nonce, &v.image, &[]).unwrap();
    let started = Instant::now();
    // Flips are independent: spread the bytes over the available cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let per_thread = v.image.len().div_ceil(threads);
    let (parse_errors, tag_errors) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (key, nonce, authentic, original) = (&key, &nonce, &authentic, &v.image);
                scope.spawn(move || {
                    let mut image = original.clone();
                    let (mut parse_errors, mut tag_errors) = (0usize, 0usize);
                    for byte in t * per_thread..((t + 1) * per_thread).min(image.len()) {
                        for bit in 0..8 {
                            image[byte] ^= 1 << bit;
                            match verify_image(key, nonce, &image, authentic) {
                                Ok(()) => panic!("flip of bit {bit} of byte {byte} went undetected"),
                                Err(SfiError::HeaderNotAuthentic | SfiError::AreaNotAuthentic { .. }) => {
                                    tag_errors += 1
                                }
                                Err(_) => parse_errors += 1,
                            }
                            image[byte] ^= 1 << bit;
                        }
                    }
                    assert_eq!(&image, original);
                    (parse_errors, tag_errors)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert_eq!(parse_errors + tag_errors, 3134 * 8);
    eprintln!(
        "{} bit flips checked in {:?}: {parse_errors} parse errors, {tag_errors} tag failures",
        v.image.len() * 8,
        started.elapsed()
    );
}

#[test]
fn expected_flash_crc_of_the_vector_image() {
    let v = Vectors::load();
    let profile = Family::Stm32L4.profile();
    let mut flash = vec![0xFFu8; profile.flash_size as usize];
    for a in v.areas().iter().filter(|a| a.area_type == AreaType::Firmware) {
        let at = (a.address - profile.flash_base) as usize;
        flash[at..at + a.data.len()].copy_from_slice(&a.data);
    }
    assert_eq!(sfi::expected_flash_crc(profile, &v.areas()), crc32fast::hash(&flash));
}

#[test]
fn chip_and_vendor_keys_from_scalars() {
    let v = Vectors::load();
    let chip = ChipKey::from_scalar(v.arr("chip_private_scalar")).unwrap();
    assert_eq!(chip.public_xy(), v.arr::<64>("chip_public_xy"));
    assert_eq!(*chip.to_scalar(), v.arr::<32>("chip_private_scalar"));
    let ca = VendorCa::from_scalar(v.arr("vendor_ca_private_scalar")).unwrap();
    assert_eq!(ca.public_key().to_xy(), v.arr::<64>("vendor_ca_public_xy"));
    assert_eq!(VendorCaPublicKey::from_xy(v.arr("vendor_ca_public_xy")).unwrap(), ca.public_key());
    // PEM round trips.
    let pem = ca.public_key().to_pem();
    assert_eq!(VendorCaPublicKey::from_pem(&pem).unwrap(), ca.public_key());
    let secret_pem = ca.to_pem();
    assert_eq!(VendorCa::from_pem(&secret_pem).unwrap().public_key(), ca.public_key());
    // Secrets never show in Debug output.
    let dbg = format!("{chip:?} {ca:?} {:?}", v.key());
    for secret in ["chip_private_scalar", "vendor_ca_private_scalar", "firmware_key"] {
        assert!(!dbg.contains(v.json[secret].as_str().unwrap()), "{secret} leaked in {dbg}");
    }
}

#[test]
fn chip_certificate_verifies_against_the_vendor_ca_only() {
    let v = Vectors::load();
    let cert = v.cert();
    assert_eq!(cert.to_bytes().to_vec(), v.hex("chip_certificate"));
    assert_eq!(cert.product_id, v.product_id());
    assert_eq!(cert.chip_pub, v.arr::<64>("chip_public_xy"));
    let ca = VendorCaPublicKey::from_xy(v.arr("vendor_ca_public_xy")).unwrap();
    cert.verify(std::slice::from_ref(&ca)).unwrap();
    // Among several trusted keys.
    let other = VendorCa::from_scalar(v.arr("other_chip_private_scalar")).unwrap().public_key();
    cert.verify(&[other.clone(), ca.clone()]).unwrap();
    // Refused against another key, and with no keys at all.
    assert!(matches!(cert.verify(std::slice::from_ref(&other)), Err(CertError::Untrusted { trusted: 1, .. })));
    assert!(matches!(cert.verify(&[]), Err(CertError::NoTrustedKeys { .. })));
    // device_id = hex(SHA-256(chip_pub))[0..32].
    use sha2::Digest;
    let digest = sha2::Sha256::digest(cert.chip_pub);
    assert_eq!(cert.device_id().to_string(), hex::encode(digest)[..32]);
    // Any single-bit flip of the certificate is refused.
    let bytes = cert.to_bytes();
    for i in 0..bytes.len() * 8 {
        let mut b = bytes;
        b[i / 8] ^= 1 << (i % 8);
        let c = ChipCertificate::parse(&b).unwrap();
        assert!(c.verify(std::slice::from_ref(&ca)).is_err(), "bit {i} flip accepted");
    }
}

#[test]
fn licence_context_and_issue_reproduce_the_vector() {
    let v = Vectors::load();
    let cert = v.cert();
    let key_id = KeyId(v.arr("key_id"));
    let eph = p256::SecretKey::from_bytes(&v.arr::<32>("ephemeral_private_scalar").into()).unwrap();
    let ctx = licence_context(&v.product_id(), &key_id, &v.nonce(), &cert.chip_pub, &v.arr("ephemeral_public_xy"));
    assert_eq!(ctx, v.arr::<32>("licence_context"));
    let licence = issue_with_ephemeral(&eph, &cert, &key_id, &v.key(), &v.nonce()).unwrap();
    assert_eq!(licence.eph_pub, v.arr::<64>("ephemeral_public_xy"));
    assert_eq!(licence.to_bytes().to_vec(), v.hex("licence"));
    assert_eq!(Licence::parse(&v.hex("licence")).unwrap(), licence);
    // KEK = AES-256-ECB_Z(ctx): two independent blocks.
    let kek = derive_kek(&[7; 32], &ctx);
    assert_ne!(kek[..16], kek[16..]);
}

#[test]
fn licence_opens_with_the_chip_key_only() {
    let v = Vectors::load();
    let licence = Licence::parse(&v.hex("licence")).unwrap();
    let chip = ChipKey::from_scalar(v.arr("chip_private_scalar")).unwrap();
    let (key, nonce) = open_licence(&licence, &chip, &v.product_id()).unwrap();
    assert_eq!(key, v.key());
    assert_eq!(nonce, v.nonce());

    let other = ChipKey::from_scalar(v.arr("other_chip_private_scalar")).unwrap();
    let err = open_licence(&licence, &other, &v.product_id()).unwrap_err();
    assert_eq!(err, LicenceError::Invalid(InvalidLicence::Unwrap));
    assert_eq!(err.sfi_status(), flashgate_common::protocol::SfiStatus::LicenceInvalid);

    let err = open_licence(&licence, &chip, b"45002001").unwrap_err();
    assert!(
        matches!(err, LicenceError::WrongProduct { licence, device } if licence == *b"46201002" && device == *b"45002001")
    );
    assert_eq!(err.sfi_status(), flashgate_common::protocol::SfiStatus::WrongProduct);
    assert_eq!(err.to_string(), "licence is for product \"46201002\", this device is product \"45002001\"");

    // Every single-bit flip of the licence is refused (parse error, wrong product or invalid).
    let bytes = licence.to_bytes();
    for i in 0..bytes.len() * 8 {
        let mut b = bytes;
        b[i / 8] ^= 1 << (i % 8);
        let opened = Licence::parse(&b).and_then(|l| open_licence(&l, &chip, &v.product_id()));
        assert!(opened.is_err(), "bit {i} flip of the licence accepted");
    }
}
