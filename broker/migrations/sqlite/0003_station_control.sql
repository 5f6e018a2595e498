-- Flashgate ledger schema v3 (sqlite dialect): batches assigned to stations by operators, and what the
-- stations attached to a broker report over StationService.Attach.
-- Keep in step with ../postgres/0003_station_control.sql.

-- What an operator decided for a station (audited: station.assigned / station.paused). Every broker on the
-- ledger polls this table and pushes changes to the stations attached to it.
CREATE TABLE station_assignments (
    identity   TEXT PRIMARY KEY,                   -- spiffe://TD/site/SITE/station/N
    batch_id   TEXT NOT NULL DEFAULT '',           -- '' when no batch has been assigned
    paused     INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    reason     TEXT NOT NULL DEFAULT '',           -- why it is paused
    revision   INTEGER NOT NULL DEFAULT 1,         -- +1 on every change (brokers push what they have not sent)
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);

-- The last report of each station (bookkeeping written on heartbeats; not audited: nothing is decided
-- from it). Online = attached and updated within the last 15 s.
CREATE TABLE station_status (
    identity       TEXT PRIMARY KEY,
    site           TEXT NOT NULL,
    broker         TEXT NOT NULL,                  -- name of the broker the station is attached to
    session        TEXT NOT NULL,                  -- that broker's id of the Attach stream
    attached       INTEGER NOT NULL DEFAULT 0 CHECK (attached IN (0, 1)),
    probes         TEXT NOT NULL DEFAULT '[]',     -- JSON array of {probe_id, kind, port}
    current_batch  TEXT NOT NULL DEFAULT '',
    devices_ok     INTEGER NOT NULL DEFAULT 0,
    devices_failed INTEGER NOT NULL DEFAULT 0,
    running        INTEGER NOT NULL DEFAULT 0 CHECK (running IN (0, 1)),
    updated_at     INTEGER NOT NULL
);
