-- Flashgate ledger schema v4 (sqlite dialect): the stations that hold a device's licence besides the one it
-- was first issued to (a board moved to another fixture and asked again: a reissue, audited as
-- licence.reissued once per station). Install reports are accepted from a holder's site only.
-- Keep in step with ../postgres/0004_licence_holders.sql.

CREATE TABLE licence_reissues (
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    device_id   TEXT NOT NULL,
    station     TEXT NOT NULL,                      -- spiffe://TD/site/SITE/station/N
    site        TEXT NOT NULL,
    reissued_at INTEGER NOT NULL,
    PRIMARY KEY (batch_id, device_id, station)
);
