-- Flashgate ledger schema v7 (SQLite dialect): refusals per device, for the device record (`admin device`),
-- the per-device export and the batch report. One row per (batch, device, station, reason) with a count, so
-- a station asking again and again for a refused device grows a counter, not the table. Every refusal is
-- still one `licence.refused` audit record (the source of truth; this table is written in the same
-- transaction). device_id is '' when the refusal came before the device was known.
-- Keep in step with ../postgres/0007_refusals.sql.

CREATE TABLE refusals (
    batch_id  TEXT NOT NULL,                  -- as asked for (the batch may not exist)
    device_id TEXT NOT NULL,
    station   TEXT NOT NULL,
    site      TEXT NOT NULL,
    reason    TEXT NOT NULL,                  -- stable reason, e.g. QUOTA_EXHAUSTED
    detail    TEXT NOT NULL,                  -- the latest refusal's detail, in words
    count     INTEGER NOT NULL CHECK (count >= 1),
    first_at  INTEGER NOT NULL,
    last_at   INTEGER NOT NULL,
    PRIMARY KEY (batch_id, device_id, station, reason)
);
CREATE INDEX refusals_by_device ON refusals (device_id);

-- Refusals recorded before v7, from their audit records.
INSERT INTO refusals (batch_id, device_id, station, site, reason, detail, count, first_at, last_at)
SELECT substr(subject, 7, instr(subject, '/device/') - 7),
       substr(subject, instr(subject, '/device/') + 8),
       COALESCE(json_extract(details, '$.station'), ''),
       COALESCE(json_extract(details, '$.site'), ''),
       COALESCE(json_extract(details, '$.reason'), ''),
       COALESCE(max(json_extract(details, '$.detail')), ''),
       count(*), min(at), max(at)
FROM audit
WHERE event = 'licence.refused' AND subject LIKE 'batch/%/device/%'
GROUP BY 1, 2, 3, 4, 5;
