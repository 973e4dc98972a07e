-- Failed sign-ins per account, shared by every replica: the per-account limit (app::auth) reads and
-- counts them here, so that guesses spread over addresses or replicas are counted together.
CREATE TABLE signin_failures (
    account    TEXT PRIMARY KEY,
    failures   BIGINT NOT NULL,
    first_at   TEXT NOT NULL,
    last_at    TEXT NOT NULL
);

-- A feed reader behind the in-memory ring reads only the events of objects it may view.
CREATE INDEX events_scope ON events(scope_id, seq);
