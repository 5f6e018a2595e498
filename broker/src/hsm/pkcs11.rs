//! The PKCS#11 backend (cryptoki): firmware keys as token objects (`CKA_ID` = key id,
//! `CKA_LABEL` = label, `CKA_SENSITIVE`, extractable only so they can be wrapped), the licence math
//! of profile §4 done inside the token, image encryption with `CKM_AES_GCM`, and a per-token pool
//! of logged-in sessions sized to the token.
//!
//! Licence, in the token, with session objects (`CKA_TOKEN=false`) destroyed afterwards:
//! `C_GenerateKeyPair(CKM_EC_KEY_PAIR_GEN, P-256)` → `e`; `C_DeriveKey(CKM_ECDH1_DERIVE, CKD_NULL,
//! 04||chip_pub)` → `Z` (CKK_AES, 32 bytes, non-extractable); `C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA,
//! ctx)` on `Z` → KEK (CKK_AES, 32 bytes, non-extractable, `CKA_WRAP`) — cryptoki 0.12.1 has no
//! safe constructor for that mechanism, so this one call goes through cryptoki-sys in a small
//! `unsafe` block (SoftHSM2 2.6.1 lacks `CKM_CONCATENATE_BASE_AND_KEY`, which rules out building
//! the KEK from two `CKM_AES_CBC_ENCRYPT_DATA` halves);
//! `C_WrapKey(CKM_AES_KEY_WRAP)` of the firmware key → 24 bytes.
//!
//! The audit-signing key is a P-256 key pair on the token (`CKA_TOKEN`, label and id
//! `flashgate-audit`; private half `CKA_SIGN`, sensitive, non-extractable), generated with
//! `C_GenerateKeyPair(CKM_EC_KEY_PAIR_GEN)` at the broker's first start; checkpoints are signed
//! with `C_Sign(CKM_ECDSA)` over their SHA-256, computed by the broker.
//!
//! Modules are loaded and `C_Initialize`d once per process and path (a module reads its
//! configuration, e.g. `SOFTHSM2_CONF`, at that moment) and never finalised.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::{KeyId, Licence, WRAPPED_KEY_LEN, licence_context};
use flashgate_common::sfi::{
    AREA_VERSION, AreaDescriptor, FirmwareKey, HEADER_LEN, IMAGE_VERSION, ImageHeader, ImageNonce, ImageValidator,
    PlainArea, ReaderOptions, SfiError, area_iv,
};
use zeroize::{Zeroize, Zeroizing};

use super::{AUDIT_KEY_LABEL, HsmBackend, HsmError, KeyInfo, check_label, licence_error, random_key_id};

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), the value of `CKA_EC_PARAMS`.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// How to reach one token.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library) path.
    pub module: PathBuf,
    /// The token's label (tokens are selected by label, never by slot index).
    pub token_label: String,
    /// The user PIN (zeroized on drop, never logged).
    pub user_pin: Zeroizing<String>,
    /// Parallel sessions to open on this token (its share of the pool); at least 1.
    pub sessions: usize,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("user_pin", &"<redacted>")
            .field("sessions", &self.sessions)
            .finish()
    }
}

impl Pkcs11Config {
    /// Default number of sessions per token.
    pub const DEFAULT_SESSIONS: usize = 4;

    /// A configuration with [`Self::DEFAULT_SESSIONS`] sessions.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, user_pin: Zeroizing<String>) -> Self {
        Self { module: module.into(), token_label: token_label.into(), user_pin, sessions: Self::DEFAULT_SESSIONS }
    }
}

/// A loaded module: cryptoki's context, plus a raw function table of the same library (the same
/// `dlopen`ed instance, so session and object handles are shared) for the one call cryptoki
/// 0.12.1 cannot express, `C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)`.
#[derive(Clone)]
struct Module {
    ctx: Pkcs11,
    raw: Arc<cryptoki_sys::Pkcs11>,
}

/// Loaded and initialised modules, one per path, for the life of the process.
fn module(path: &Path) -> Result<Module, HsmError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    let mut modules = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let err = |reason: String| HsmError::Module { path: path.to_path_buf(), reason };
    let ctx = Pkcs11::new(path).map_err(|e| err(format!("cannot load: {e}")))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err(format!("C_Initialize failed: {}", rv_name(&e)))),
    }
    let raw = load_raw(path).map_err(|e| err(format!("cannot load the raw function table: {e}")))?;
    if raw.C_DeriveKey.is_err() {
        return Err(err("the module exports no C_DeriveKey".into()));
    }
    let m = Module { ctx, raw: Arc::new(raw) };
    modules.insert(path.to_path_buf(), m.clone());
    Ok(m)
}

#[allow(unsafe_code)]
fn load_raw(path: &Path) -> Result<cryptoki_sys::Pkcs11, String> {
    // SAFETY: loads the same PKCS#11 library cryptoki has just loaded and initialised (dlopen
    // returns the already-mapped instance; its initialisers ran then), and only resolves symbols.
    unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(|e| e.to_string())
}

/// `CKR_DEVICE_ERROR`-style name of a cryptoki error (or its text for non-PKCS#11 errors).
fn rv_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => {
            let camel = format!("{rv:?}");
            let mut out = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
        other => other.to_string(),
    }
}

/// Session objects that must not outlive one operation: destroyed on drop.
struct Scratch<'s> {
    session: &'s Session,
    handles: Vec<ObjectHandle>,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        for h in self.handles.drain(..).rev() {
            if let Err(e) = self.session.destroy_object(h) {
                tracing::warn!(error = %rv_name(&e), "C_DestroyObject of a session key failed (closed with the session)");
            }
        }
    }
}

struct Sessions {
    idle: Vec<Session>,
    open: usize,
}

/// A PKCS#11 token holding firmware keys.
pub struct Pkcs11Hsm {
    name: String,
    config: Pkcs11Config,
    ctx: Pkcs11,
    raw: Arc<cryptoki_sys::Pkcs11>,
    slot: Slot,
    sessions: Mutex<Sessions>,
    available: Condvar,
    /// Key id → token object handle (valid across this application's sessions).
    handles: RwLock<HashMap<KeyId, ObjectHandle>>,
    /// The audit-signing private key's handle, once found or generated.
    audit: RwLock<Option<ObjectHandle>>,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm").field("name", &self.name).field("config", &self.config).finish_non_exhaustive()
    }
}

/// A session checked out of the pool; returned on drop unless it failed.
struct Lease<'a> {
    hsm: &'a Pkcs11Hsm,
    session: Option<Session>,
    broken: bool,
}

impl Lease<'_> {
    fn session(&self) -> &Session {
        // Set at creation and taken only in drop.
        match &self.session {
            Some(s) => s,
            None => unreachable!("lease used after drop"),
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut s = self.hsm.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match self.session.take() {
            Some(session) if !self.broken => s.idle.push(session),
            _ => s.open -= 1,
        }
        drop(s);
        self.hsm.available.notify_one();
    }
}

impl Pkcs11Hsm {
    /// Load the module, find the token by label, open one session and log in (more sessions
    /// are opened on demand up to `config.sessions`).
    pub fn connect(config: Pkcs11Config) -> Result<Self, HsmError> {
        let Module { ctx, raw } = module(&config.module)?;
        let token = config.token_label.clone();
        let p11 = |function: &'static str| {
            let token = token.clone();
            move |e: CkError| HsmError::Pkcs11 { function, mechanism: None, token, rv: rv_name(&e) }
        };
        let mut present = Vec::new();
        let mut found = None;
        for slot in ctx.get_slots_with_initialized_token().map_err(p11("C_GetSlotList"))? {
            let info = ctx.get_token_info(slot).map_err(p11("C_GetTokenInfo"))?;
            let label = info.label().trim_end().to_string();
            if label == config.token_label {
                found = Some(slot);
                break;
            }
            present.push(label);
        }
        let slot = found.ok_or_else(|| HsmError::TokenNotFound {
            module: config.module.clone(),
            label: config.token_label.clone(),
            present: present.join(", "),
        })?;
        let hsm = Self {
            name: format!("pkcs11:{}", config.token_label),
            ctx,
            raw,
            slot,
            sessions: Mutex::new(Sessions { idle: Vec::new(), open: 0 }),
            available: Condvar::new(),
            handles: RwLock::new(HashMap::new()),
            audit: RwLock::new(None),
            config,
        };
        // Open and log in the first session now, so a wrong PIN fails here.
        let first = hsm.open_session()?;
        let mut s = hsm.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.idle.push(first);
        s.open = 1;
        drop(s);
        Ok(hsm)
    }

    fn err(&self, function: &'static str, mechanism: Option<&'static str>) -> impl FnOnce(CkError) -> HsmError + '_ {
        move |e| HsmError::Pkcs11 { function, mechanism, token: self.config.token_label.clone(), rv: rv_name(&e) }
    }

    fn open_session(&self) -> Result<Session, HsmError> {
        let session = self.ctx.open_rw_session(self.slot).map_err(self.err("C_OpenSession", None))?;
        let pin = AuthPin::from(self.config.user_pin.as_str().to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(self.err("C_Login", None)(e)),
        }
    }

    /// Check out a session: an idle one, a new one if under the limit, or wait for one.
    fn lease(&self) -> Result<Lease<'_>, HsmError> {
        let limit = self.config.sessions.max(1);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(session) = s.idle.pop() {
                return Ok(Lease { hsm: self, session: Some(session), broken: false });
            }
            if s.open < limit {
                s.open += 1;
                drop(s);
                return match self.open_session() {
                    Ok(session) => Ok(Lease { hsm: self, session: Some(session), broken: false }),
                    Err(e) => {
                        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                        s.open -= 1;
                        Err(e)
                    }
                };
            }
            s = self.available.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Run `f` on a leased session; a device error discards the session (and the handle cache).
    fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let mut lease = self.lease()?;
        let r = f(lease.session());
        if let Err(e) = &r
            && e.is_device_error()
        {
            lease.broken = true;
            self.handles.write().unwrap_or_else(|p| p.into_inner()).clear();
            *self.audit.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        r
    }

    fn find_key(&self, session: &Session, key_id: &KeyId) -> Result<Option<ObjectHandle>, HsmError> {
        if let Some(h) = self.handles.read().unwrap_or_else(|p| p.into_inner()).get(key_id) {
            return Ok(Some(*h));
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Id(key_id.0.to_vec()),
            ])
            .map_err(self.err("C_FindObjects", None))?;
        let h = found.first().copied();
        if let Some(h) = h {
            self.handles.write().unwrap_or_else(|p| p.into_inner()).insert(*key_id, h);
        }
        Ok(h)
    }

    fn key(&self, session: &Session, key_id: &KeyId) -> Result<ObjectHandle, HsmError> {
        self.find_key(session, key_id)?.ok_or(HsmError::UnknownKey { member: self.name.clone(), key_id: *key_id })
    }

    fn firmware_key_template(key_id: &KeyId, label: &str) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            // Extractable only so that it can be wrapped (licences, key ceremony); sensitive keys
            // never leave the token in clear.
            Attribute::Extractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Id(key_id.0.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ]
    }

    fn gcm_encrypt(
        &self,
        session: &Session,
        key: ObjectHandle,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16]), HsmError> {
        let mut iv = *iv;
        let params =
            GcmParams::new(&mut iv, aad, 128.into()).map_err(self.err("C_EncryptInit", Some("CKM_AES_GCM")))?;
        let mut out = session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(self.err("C_Encrypt", Some("CKM_AES_GCM")))?;
        if out.len() != plaintext.len() + 16 {
            return Err(HsmError::TokenReply {
                token: self.config.token_label.clone(),
                what: "AES-GCM ciphertext",
                reason: format!("expected {} bytes (data + 16-byte tag), got {}", plaintext.len() + 16, out.len()),
            });
        }
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&out[plaintext.len()..]);
        out.truncate(plaintext.len());
        Ok((out, tag))
    }

    /// The licence sequence of profile §4 in the token (see the module header).
    fn licence_in_token(
        &self,
        session: &Session,
        key_id: &KeyId,
        cert: &ChipCertificate,
        nonce: &ImageNonce,
    ) -> Result<Licence, HsmError> {
        let fw_key = self.key(session, key_id)?;
        let mut scratch = Scratch { session, handles: Vec::new() };
        let (eph_pub, eph_priv) = session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::Token(false), Attribute::EcParams(P256_OID_DER.to_vec())],
                &[
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Derive(true),
                ],
            )
            .map_err(self.err("C_GenerateKeyPair", Some("CKM_EC_KEY_PAIR_GEN")))?;
        scratch.handles.push(eph_pub);
        scratch.handles.push(eph_priv);
        let eph_xy = self.read_ec_point(session, eph_pub)?;

        let secret = |len: u64, derive: bool, wrap: bool| {
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(len.into()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(derive),
                Attribute::Wrap(wrap),
            ]
        };
        let mut chip_point = [0u8; 65];
        chip_point[0] = 0x04;
        chip_point[1..].copy_from_slice(&cert.chip_pub);
        let z = session
            .derive_key(
                &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &chip_point)),
                eph_priv,
                &secret(32, true, false),
            )
            .map_err(self.err("C_DeriveKey", Some("CKM_ECDH1_DERIVE")))?;
        scratch.handles.push(z);

        let ctx = licence_context(&cert.product_id, key_id, nonce, &cert.chip_pub, &eph_xy);
        let kek = self.derive_ecb_encrypt_data(session, z, &ctx, &secret(32, false, true))?;
        scratch.handles.push(kek);

        let wrapped = session
            .wrap_key(&Mechanism::AesKeyWrap, kek, fw_key)
            .map_err(self.err("C_WrapKey", Some("CKM_AES_KEY_WRAP")))?;
        let wrapped_key: [u8; WRAPPED_KEY_LEN] = wrapped.as_slice().try_into().map_err(|_| HsmError::TokenReply {
            token: self.config.token_label.clone(),
            what: "wrapped key",
            reason: format!("expected {WRAPPED_KEY_LEN} bytes, got {}", wrapped.len()),
        })?;
        drop(scratch);
        Ok(Licence { product_id: cert.product_id, key_id: *key_id, nonce: *nonce, eph_pub: eph_xy, wrapped_key })
    }

    /// `CKA_EC_POINT` of a public key as X||Y (accepts DER OCTET STRING-wrapped or raw 04||X||Y).
    fn read_ec_point(&self, session: &Session, key: ObjectHandle) -> Result<[u8; 64], HsmError> {
        let attrs =
            session.get_attributes(key, &[AttributeType::EcPoint]).map_err(self.err("C_GetAttributeValue", None))?;
        let point = attrs
            .into_iter()
            .find_map(|a| if let Attribute::EcPoint(p) = a { Some(p) } else { None })
            .unwrap_or_default();
        parse_ec_point(&point).map_err(|reason| HsmError::TokenReply {
            token: self.config.token_label.clone(),
            what: "CKA_EC_POINT",
            reason,
        })
    }

    /// `C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)`: a new key whose value is `data` encrypted with
    /// AES-ECB under `base`, created inside the token with `template`. cryptoki 0.12.1 has no safe
    /// constructor for this mechanism, so the call goes through the raw function table.
    #[allow(unsafe_code)]
    fn derive_ecb_encrypt_data(
        &self,
        session: &Session,
        base: ObjectHandle,
        data: &[u8; 32],
        template: &[Attribute],
    ) -> Result<ObjectHandle, HsmError> {
        let fail = |rv: String| HsmError::Pkcs11 {
            function: "C_DeriveKey",
            mechanism: Some("CKM_AES_ECB_ENCRYPT_DATA"),
            token: self.config.token_label.clone(),
            rv,
        };
        let mut data = *data;
        let mut params = cryptoki_sys::CK_KEY_DERIVATION_STRING_DATA { pData: data.as_mut_ptr(), ulLen: 32 };
        let mut mechanism = cryptoki_sys::CK_MECHANISM {
            mechanism: cryptoki_sys::CKM_AES_ECB_ENCRYPT_DATA,
            pParameter: (&mut params as *mut cryptoki_sys::CK_KEY_DERIVATION_STRING_DATA).cast(),
            ulParameterLen: std::mem::size_of::<cryptoki_sys::CK_KEY_DERIVATION_STRING_DATA>()
                as cryptoki_sys::CK_ULONG,
        };
        let mut attrs: Vec<cryptoki_sys::CK_ATTRIBUTE> = template.iter().map(Into::into).collect();
        let mut handle: cryptoki_sys::CK_OBJECT_HANDLE = 0;
        // SAFETY: `raw` is the function table of the initialised module that opened `session`
        // (checked at load to export C_DeriveKey). Every pointer passed refers to a live local
        // (`mechanism` → `params` → `data`; `attrs`, whose entries point into `template`, borrowed
        // for the whole call) with the length PKCS#11 expects; the module writes only `handle`.
        let rv = unsafe {
            self.raw.C_DeriveKey(
                session.handle(),
                &mut mechanism,
                base.handle(),
                attrs.as_mut_ptr(),
                attrs.len() as cryptoki_sys::CK_ULONG,
                &mut handle,
            )
        };
        data.zeroize();
        match cryptoki::error::Rv::from(rv) {
            cryptoki::error::Rv::Ok => {
                // SAFETY: the module has just created this object in this session.
                Ok(unsafe { ObjectHandle::new_from_raw(handle) })
            }
            cryptoki::error::Rv::Error(e) => {
                Err(fail(rv_name(&CkError::Pkcs11(e, cryptoki::context::Function::DeriveKey))))
            }
        }
    }

    fn create_key(&self, key_id: KeyId, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        check_label(label)?;
        self.with_session(|session| {
            if self.find_key(session, &key_id)?.is_some() {
                return Err(HsmError::DuplicateKey { member: self.name.clone(), key_id });
            }
            let mut template = Self::firmware_key_template(&key_id, label);
            template.push(Attribute::Value(key.as_bytes().to_vec()));
            let r = session.create_object(&template);
            for a in &mut template {
                if let Attribute::Value(v) = a {
                    v.zeroize();
                }
            }
            let h = r.map_err(self.err("C_CreateObject", None))?;
            self.handles.write().unwrap_or_else(|p| p.into_inner()).insert(key_id, h);
            Ok(KeyInfo { key_id, label: label.to_string() })
        })
    }
}

impl Pkcs11Hsm {
    /// The template that finds one half of the audit key pair.
    fn audit_template(class: ObjectClass) -> Vec<Attribute> {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
        ]
    }

    /// The audit key pair's handles (private, public), if the token holds it.
    fn find_audit_pair(&self, session: &Session) -> Result<Option<(ObjectHandle, ObjectHandle)>, HsmError> {
        let find = |class| session.find_objects(&Self::audit_template(class)).map_err(self.err("C_FindObjects", None));
        let private = find(ObjectClass::PRIVATE_KEY)?;
        let public = find(ObjectClass::PUBLIC_KEY)?;
        match (private.first(), public.first()) {
            (Some(p), Some(q)) => Ok(Some((*p, *q))),
            (None, None) => Ok(None),
            _ => Err(HsmError::TokenReply {
                token: self.config.token_label.clone(),
                what: "audit-signing key pair",
                reason: format!("only one half of the {AUDIT_KEY_LABEL:?} key pair is on the token"),
            }),
        }
    }

    fn audit_public(&self, session: &Session, public: ObjectHandle) -> Result<p256::ecdsa::VerifyingKey, HsmError> {
        let xy = self.read_ec_point(session, public)?;
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..].copy_from_slice(&xy);
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| HsmError::TokenReply {
            token: self.config.token_label.clone(),
            what: "CKA_EC_POINT of the audit-signing key",
            reason: "not a point on P-256".into(),
        })
    }
}

/// Parse an EC point as tokens return it: DER `OCTET STRING` (04 41 04||X||Y) or raw 04||X||Y.
pub fn parse_ec_point(bytes: &[u8]) -> Result<[u8; 64], String> {
    let raw = match bytes {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        [0x04, ..] if bytes.len() == 65 => bytes,
        _ => return Err(format!("expected 04||X||Y (65 bytes), possibly DER-wrapped, got {} bytes", bytes.len())),
    };
    if raw[0] != 0x04 {
        return Err(format!("expected an uncompressed point (0x04), found {:#04x}", raw[0]));
    }
    let mut xy = [0u8; 64];
    xy.copy_from_slice(&raw[1..]);
    Ok(xy)
}

impl HsmBackend for Pkcs11Hsm {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        check_label(label)?;
        let key_id = random_key_id();
        self.with_session(|session| {
            let mut template = Self::firmware_key_template(&key_id, label);
            template.push(Attribute::ValueLen(16.into()));
            let h = session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(self.err("C_GenerateKey", Some("CKM_AES_KEY_GEN")))?;
            self.handles.write().unwrap_or_else(|p| p.into_inner()).insert(key_id, h);
            tracing::info!(member = %self.name, %key_id, label, "firmware key generated in token");
            Ok(KeyInfo { key_id, label: label.to_string() })
        })
    }

    fn import_key_with_id(&self, key_id: KeyId, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        let info = self.create_key(key_id, label, key)?;
        tracing::info!(member = %self.name, %key_id, label, "firmware key imported into token");
        Ok(info)
    }

    fn has_key(&self, key_id: &KeyId) -> Result<bool, HsmError> {
        self.with_session(|s| Ok(self.find_key(s, key_id)?.is_some()))
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        self.with_session(|session| {
            let handles = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                ])
                .map_err(self.err("C_FindObjects", None))?;
            let mut keys = Vec::new();
            for h in handles {
                let attrs = session
                    .get_attributes(h, &[AttributeType::Id, AttributeType::Label])
                    .map_err(self.err("C_GetAttributeValue", None))?;
                let (mut id, mut label) = (None, String::new());
                for a in attrs {
                    match a {
                        Attribute::Id(v) => id = <[u8; 16]>::try_from(v.as_slice()).ok(),
                        Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                        _ => {}
                    }
                }
                if let Some(id) = id {
                    keys.push(KeyInfo { key_id: KeyId(id), label });
                }
            }
            keys.sort_by_key(|k| k.key_id);
            Ok(keys)
        })
    }

    fn issue_licence(&self, key_id: &KeyId, cert: &ChipCertificate, nonce: &ImageNonce) -> Result<Licence, HsmError> {
        // Logical check first: an unusable chip point must not count as a device failure.
        cert.chip_public_key().map_err(|e| licence_error(cert, e.into()))?;
        self.with_session(|session| self.licence_in_token(session, key_id, cert, nonce))
    }

    fn encrypt_image(&self, key_id: &KeyId, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, HsmError> {
        // Validate exactly as common::sfi::write_image does before encrypting anything.
        let count = u16::try_from(areas.len())
            .ok()
            .filter(|c| (1..=flashgate_common::sfi::MAX_AREAS).contains(c))
            .ok_or(SfiError::AreaCount { count: areas.len() })?;
        let mut header = ImageHeader { version: IMAGE_VERSION, area_count: count, tag: [0; 16] };
        let mut descriptors = Vec::with_capacity(areas.len());
        {
            let mut validator = ImageValidator::new(&header.to_bytes(), ReaderOptions::default())?;
            for (index, a) in (1..=count).zip(areas) {
                let size = u32::try_from(a.data.len())
                    .ok()
                    .filter(|s| *s <= flashgate_common::sfi::MAX_AREA_SIZE)
                    .ok_or(SfiError::AreaTooLarge { index: index.into(), size: a.data.len() })?;
                let desc = AreaDescriptor {
                    area_type: a.area_type,
                    version: AREA_VERSION,
                    index,
                    size,
                    address: a.address,
                    area_count: count,
                    tag: [0; 16],
                };
                validator.next_descriptor(&desc.to_bytes())?;
                descriptors.push(desc);
            }
        }
        self.with_session(|session| {
            let key = self.key(session, key_id)?;
            let total = HEADER_LEN + areas.iter().map(|a| 30 + a.data.len()).sum::<usize>();
            let mut out = Vec::with_capacity(total);
            let (_, tag) = self.gcm_encrypt(session, key, nonce.as_bytes(), &header.aad(), &[])?;
            header.tag = tag;
            out.extend_from_slice(&header.to_bytes());
            for (desc, a) in descriptors.iter_mut().zip(areas) {
                let (ct, tag) = self.gcm_encrypt(session, key, &area_iv(nonce, desc.index), &desc.aad(), &a.data)?;
                desc.tag = tag;
                out.extend_from_slice(&desc.to_bytes());
                out.extend_from_slice(&ct);
            }
            Ok(out)
        })
    }

    fn ensure_audit_key(&self) -> Result<p256::ecdsa::VerifyingKey, HsmError> {
        self.with_session(|session| {
            if let Some((private, public)) = self.find_audit_pair(session)? {
                *self.audit.write().unwrap_or_else(|p| p.into_inner()) = Some(private);
                return self.audit_public(session, public);
            }
            let label = AUDIT_KEY_LABEL.as_bytes().to_vec();
            let (public, private) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Verify(true),
                        Attribute::EcParams(P256_OID_DER.to_vec()),
                        Attribute::Label(label.clone()),
                        Attribute::Id(label.clone()),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        Attribute::Derive(false),
                        Attribute::Label(label.clone()),
                        Attribute::Id(label),
                    ],
                )
                .map_err(self.err("C_GenerateKeyPair", Some("CKM_EC_KEY_PAIR_GEN")))?;
            *self.audit.write().unwrap_or_else(|p| p.into_inner()) = Some(private);
            tracing::info!(member = %self.name, label = AUDIT_KEY_LABEL, "audit-signing key pair generated on the token");
            self.audit_public(session, public)
        })
    }

    fn sign_audit(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(message);
        self.with_session(|session| {
            let cached = *self.audit.read().unwrap_or_else(|p| p.into_inner());
            let private = match cached {
                Some(h) => h,
                None => {
                    let (h, _) = self
                        .find_audit_pair(session)?
                        .ok_or_else(|| HsmError::NoAuditKey { member: self.name.clone() })?;
                    *self.audit.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
                    h
                }
            };
            let sig =
                session.sign(&Mechanism::Ecdsa, private, &digest).map_err(self.err("C_Sign", Some("CKM_ECDSA")))?;
            <[u8; 64]>::try_from(sig.as_slice()).map_err(|_| HsmError::TokenReply {
                token: self.config.token_label.clone(),
                what: "ECDSA signature",
                reason: format!("expected r || s (64 bytes), got {} bytes", sig.len()),
            })
        })
    }

    fn health(&self) -> Result<(), HsmError> {
        self.with_session(|session| {
            session.get_session_info().map_err(self.err("C_GetSessionInfo", None))?;
            Ok(())
        })
    }

    fn capacity(&self) -> usize {
        self.config.sessions.max(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn ec_points_raw_and_der() {
        let mut raw = vec![0x04];
        raw.extend((0..64).map(|i| i as u8));
        let xy = parse_ec_point(&raw).unwrap();
        assert_eq!(xy[0], 0);
        assert_eq!(xy[63], 63);
        let mut der = vec![0x04, 0x41];
        der.extend(&raw);
        assert_eq!(parse_ec_point(&der).unwrap(), xy);
        assert!(parse_ec_point(&raw[..64]).is_err());
    }

    #[test]
    fn rv_names_are_ckr_constants() {
        let e = CkError::Pkcs11(RvError::DeviceError, cryptoki::context::Function::DeriveKey);
        assert_eq!(rv_name(&e), "CKR_DEVICE_ERROR");
    }
}
