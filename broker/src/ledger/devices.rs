//! The per-device record read from the ledger (`flashgate-devices-v1`, `flashgate_common::device_export`):
//! one device's rows for `admin device`, and a batch's rows for `admin export devices`, `admin batch
//! report` and the certificate of conformance, streamed from one database snapshot in pages of
//! [`DEVICE_PAGE`] devices (keyset pagination on the device id over licences, installs and refusals), so a
//! million devices take the memory of one page.

use std::collections::{BTreeMap, VecDeque};

use flashgate_common::device_export::{
    Attempt, DeviceCounts, DeviceRow, LicenceInfo, MAX_ATTEMPTS_PER_DEVICE, MAX_REFUSALS_PER_DEVICE, RefusalInfo,
    Verdict, status_words,
};
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};
use tokio::sync::mpsc;

use super::model::Batch;
use super::{Ledger, LedgerError, load_batch, snapshot_with_head};

/// Devices read per page of an export.
pub const DEVICE_PAGE: i64 = 500;

/// What an export of a batch's devices covered, for the certificate of conformance.
#[derive(Debug, Clone)]
pub struct DevicesExported {
    /// The batch as the snapshot held it.
    pub batch: Batch,
    /// The snapshot's audit head.
    pub head_seq: i64,
    /// Its hash.
    pub head_hash: Vec<u8>,
    /// Counts over the rows.
    pub counts: DeviceCounts,
    /// Attempts the ledger holds for the batch.
    pub attempts: u64,
    /// Hex SHA-256 of the lines sent.
    pub sha256: String,
    /// Their length in bytes.
    pub bytes: u64,
}

fn sent_away() -> LedgerError {
    LedgerError::Io {
        what: "device export",
        source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the receiver went away"),
    }
}

/// Stage timings and probe of an install row's `timings` JSON (`{"<stage>_us": n, …, "probe": {…}}`).
fn parse_timings(json: &str) -> (BTreeMap<String, u64>, String, String) {
    let mut stages = BTreeMap::new();
    let (mut probe_id, mut probe_kind) = (String::new(), String::new());
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) {
        for (k, v) in map {
            if k == "probe" {
                probe_id = v.get("id").and_then(|x| x.as_str()).unwrap_or_default().to_owned();
                probe_kind = v.get("kind").and_then(|x| x.as_str()).unwrap_or_default().to_owned();
            } else if let (Some(stage), Some(us)) = (k.strip_suffix("_us"), v.as_u64()) {
                stages.insert(stage.to_owned(), us);
            }
        }
    }
    (stages, probe_id, probe_kind)
}

/// The rows of `batch` for devices `first..=last` (ids as text), in id order.
async fn rows_between(
    conn: &mut AnyConnection,
    batch: &Batch,
    first: &str,
    last: &str,
) -> Result<Vec<DeviceRow>, sqlx::Error> {
    #[derive(Default)]
    struct Acc {
        licence: Option<(LicenceInfo, String)>,
        attempts: VecDeque<Attempt>,
        attempts_total: u64,
        refusals: Vec<RefusalInfo>,
    }
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    let range = "batch_id = $1 AND device_id >= $2 AND device_id <= $3";
    let lic = sqlx::query(&format!(
        "SELECT device_id, licence, certificate, station, site, issued_at FROM licences WHERE {range} ORDER BY device_id"
    ))
    .bind(&batch.id)
    .bind(first)
    .bind(last)
    .fetch_all(&mut *conn)
    .await?;
    for r in &lic {
        let licence: Vec<u8> = r.try_get(1)?;
        let certificate: Vec<u8> = r.try_get(2)?;
        let info = LicenceInfo {
            station: r.try_get(3)?,
            site: r.try_get(4)?,
            issued_at_ms: r.try_get(5)?,
            key_id: batch.key_id.clone(),
            image_sha256: batch.image_sha256.clone(),
            licence_sha256: hex::encode(Sha256::digest(&licence)),
            reissued_to: Vec::new(),
        };
        acc.entry(r.try_get(0)?).or_default().licence = Some((info, hex::encode(certificate)));
    }
    let re = sqlx::query(&format!(
        "SELECT device_id, station FROM licence_reissues WHERE {range} ORDER BY device_id, reissued_at, station"
    ))
    .bind(&batch.id)
    .bind(first)
    .bind(last)
    .fetch_all(&mut *conn)
    .await?;
    for r in &re {
        let id: String = r.try_get(0)?;
        if let Some((l, _)) = acc.get_mut(&id).and_then(|a| a.licence.as_mut()) {
            l.reissued_to.push(r.try_get(1)?);
        }
    }
    let inst = sqlx::query(&format!(
        "SELECT device_id, station, result_id, status_code, message, flash_crc, attempt, timings, reported_at \
         FROM installs WHERE {range} ORDER BY device_id, reported_at, station, result_id"
    ))
    .bind(&batch.id)
    .bind(first)
    .bind(last)
    .fetch_all(&mut *conn)
    .await?;
    for r in &inst {
        let code: i64 = r.try_get(3)?;
        let crc: Option<i64> = r.try_get(5)?;
        let attempt: i64 = r.try_get(6)?;
        let timings: String = r.try_get(7)?;
        let (timings_us, probe_id, probe_kind) = parse_timings(&timings);
        // Codes are stored from a u16 (the service validates them); anything else is shown as unknown.
        let status_code = u16::try_from(code).unwrap_or(u16::MAX - 1);
        let a = acc.entry(r.try_get(0)?).or_default();
        a.attempts_total += 1;
        if a.attempts.len() == MAX_ATTEMPTS_PER_DEVICE {
            a.attempts.pop_front();
        }
        a.attempts.push_back(Attempt {
            station: r.try_get(1)?,
            result_id: r.try_get(2)?,
            attempt: u32::try_from(attempt).unwrap_or(0),
            probe_id,
            probe_kind,
            status_code,
            status: status_words(status_code),
            message: r.try_get(4)?,
            flash_crc: crc.and_then(|c| u32::try_from(c).ok()),
            reported_at_ms: r.try_get(8)?,
            timings_us,
        });
    }
    let refs = sqlx::query(&format!(
        "SELECT device_id, station, site, reason, detail, count, first_at, last_at FROM refusals \
         WHERE {range} AND device_id <> '' ORDER BY device_id, first_at, station, reason"
    ))
    .bind(&batch.id)
    .bind(first)
    .bind(last)
    .fetch_all(&mut *conn)
    .await?;
    for r in &refs {
        let count: i64 = r.try_get(5)?;
        let a = acc.entry(r.try_get(0)?).or_default();
        if a.refusals.len() < MAX_REFUSALS_PER_DEVICE {
            a.refusals.push(RefusalInfo {
                station: r.try_get(1)?,
                site: r.try_get(2)?,
                reason: r.try_get(3)?,
                detail: r.try_get(4)?,
                count: u64::try_from(count).unwrap_or(0),
                first_at_ms: r.try_get(6)?,
                last_at_ms: r.try_get(7)?,
            });
        }
    }
    Ok(acc
        .into_iter()
        .map(|(device_id, a)| {
            let attempts: Vec<Attempt> = a.attempts.into();
            let (licence, certificate) = match a.licence {
                Some((l, c)) => (Some(l), c),
                None => (None, String::new()),
            };
            DeviceRow {
                batch_id: batch.id.clone(),
                verdict: Verdict::of(licence.is_some(), &attempts, !a.refusals.is_empty()),
                product_id: if licence.is_some() { batch.product_id.clone() } else { String::new() },
                device_id,
                certificate,
                licence,
                attempts,
                attempts_total: a.attempts_total,
                refusals: a.refusals,
            }
        })
        .collect())
}

/// The next page of device ids of `batch` after `after`: the union of those licensed, reported and
/// refused, each side limited first so no side is read whole.
async fn next_ids(conn: &mut AnyConnection, batch: &str, after: &str) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT device_id FROM (SELECT device_id FROM licences WHERE batch_id = $1 AND device_id > $2 \
           ORDER BY device_id LIMIT $3) l \
         UNION SELECT device_id FROM (SELECT DISTINCT device_id FROM installs WHERE batch_id = $1 AND device_id > $2 \
           ORDER BY device_id LIMIT $3) i \
         UNION SELECT device_id FROM (SELECT DISTINCT device_id FROM refusals WHERE batch_id = $1 AND device_id > $2 \
           AND device_id <> '' ORDER BY device_id LIMIT $3) r \
         ORDER BY device_id LIMIT $3",
    )
    .bind(batch)
    .bind(after)
    .bind(DEVICE_PAGE)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

impl Ledger {
    /// The record of one device in every batch that knows it (licensed, reported or refused), by batch id.
    pub async fn device_rows(&self, device_id: &str) -> Result<Vec<DeviceRow>, LedgerError> {
        const OP: &str = "read device record";
        let mut pooled = self.read_conn().await?;
        let (mut conn, _, _) = snapshot_with_head(&mut pooled, self.dialect(), OP).await?;
        let batches = sqlx::query(
            "SELECT batch_id FROM licences WHERE device_id = $1 UNION SELECT batch_id FROM installs WHERE device_id = $1 \
             UNION SELECT batch_id FROM refusals WHERE device_id = $1 ORDER BY batch_id",
        )
        .bind(device_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        let mut out = Vec::new();
        for r in &batches {
            let id: String = r.try_get(0).map_err(LedgerError::db(OP))?;
            // A refusal can name a batch that does not exist; it has no row here.
            let Some(batch) = load_batch(&mut conn, &id).await.map_err(LedgerError::db(OP))? else { continue };
            out.extend(rows_between(&mut conn, &batch, device_id, device_id).await.map_err(LedgerError::db(OP))?);
        }
        conn.rollback().await.map_err(LedgerError::db(OP))?;
        Ok(out)
    }

    /// Streams every device row of `batch_id` to `out` as canonical lines, in device id order, from one
    /// snapshot; returns what the lines covered (the head of that snapshot, counts, their SHA-256).
    pub async fn export_devices(
        &self,
        batch_id: &str,
        out: &mpsc::Sender<String>,
    ) -> Result<DevicesExported, LedgerError> {
        self.for_each_device(batch_id, |row| {
            let line = row.to_line();
            async move { out.send(line).await.map_err(|_| sent_away()) }
        })
        .await
    }

    /// Calls `f` with every device row of `batch_id` from one snapshot (see [`Ledger::export_devices`]).
    pub async fn for_each_device<F, Fut>(&self, batch_id: &str, mut f: F) -> Result<DevicesExported, LedgerError>
    where
        F: FnMut(DeviceRow) -> Fut,
        Fut: Future<Output = Result<(), LedgerError>>,
    {
        const OP: &str = "export devices";
        let mut pooled = self.read_conn().await?;
        let (mut conn, head_seq, head_hash) = snapshot_with_head(&mut pooled, self.dialect(), OP).await?;
        let batch = load_batch(&mut conn, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: batch_id.to_owned() })?;
        let mut hash = Sha256::new();
        let (mut counts, mut attempts, mut bytes) = (DeviceCounts::default(), 0u64, 0u64);
        let mut after = String::new();
        loop {
            let ids = next_ids(&mut conn, batch_id, &after).await.map_err(LedgerError::db(OP))?;
            let (Some(first), Some(last)) = (ids.first(), ids.last()) else { break };
            let rows = rows_between(&mut conn, &batch, first, last).await.map_err(LedgerError::db(OP))?;
            for row in rows {
                let line = row.to_line();
                hash.update(line.as_bytes());
                bytes += line.len() as u64;
                counts.add(&row);
                attempts += row.attempts_total;
                f(row).await?;
            }
            after = last.clone();
        }
        conn.rollback().await.map_err(LedgerError::db(OP))?;
        Ok(DevicesExported {
            batch,
            head_seq,
            head_hash,
            counts,
            attempts,
            sha256: hex::encode(hash.finalize()),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_json_gives_stages_and_probe() {
        let (stages, id, kind) =
            parse_timings(r#"{"licence_us":12,"install_us":700,"probe":{"id":"p3","kind":"serial","port":"/dev/x"}}"#);
        assert_eq!(stages, BTreeMap::from([("install".to_owned(), 700), ("licence".to_owned(), 12)]));
        assert_eq!((id.as_str(), kind.as_str()), ("p3", "serial"));
        assert_eq!(parse_timings("not json"), (BTreeMap::new(), String::new(), String::new()));
    }
}
