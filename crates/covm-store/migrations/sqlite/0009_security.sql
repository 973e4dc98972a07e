-- Security (issue 16). The certificate a node's replica is trusted by when it serves TLS (its own CA,
-- or the root end of the operator's chain), so that replicas forward to each other over TLS.
ALTER TABLE nodes ADD COLUMN ca_pem TEXT;

-- Two-factor sign-in (TOTP, RFC 6238). `mfa_secret` is the base32 secret (set at enrollment, kept
-- while `mfa_on` is 0 until a code confirms it); `mfa_step` is the last time step whose code was
-- accepted, so that no code is accepted twice.
ALTER TABLE users ADD COLUMN mfa_secret TEXT;
ALTER TABLE users ADD COLUMN mfa_on BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN mfa_step BIGINT NOT NULL DEFAULT 0;
-- Single-use recovery codes (SHA-256 of each), made at enrollment.
CREATE TABLE mfa_recovery (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash    TEXT NOT NULL,
    used_at TEXT,
    PRIMARY KEY (user_id, hash)
);
-- A session that may only enroll in two-factor sign-in (a policy requires it of the user).
ALTER TABLE tokens ADD COLUMN enroll_only BIGINT NOT NULL DEFAULT 0;

-- Conditions on grants: the whole conditions as JSON (`GrantConditions`); the annotation conditions
-- also as rows, and every VM's annotations as rows, so that the rule of the nearest grant can check
-- them in SQL against each object it looks at.
ALTER TABLE permissions ADD COLUMN conditions TEXT;
CREATE TABLE permission_annotations (
    permission_id TEXT NOT NULL REFERENCES permissions(id) ON DELETE CASCADE,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (permission_id, key)
);
CREATE TABLE object_annotations (
    object_id TEXT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (object_id, key)
);
INSERT INTO object_annotations (object_id, key, value)
    SELECT v.id, a.key, a.value FROM vms v, json_each(v.config, '$.annotations') a;

-- Single sign-on: the identity provider's subject (`issuer#sub`) a user was made for; such a user has
-- no password in covm, and a local user of the same name is never taken over.
ALTER TABLE users ADD COLUMN sso_subject TEXT;
-- A disabled user (its identity provider said so) signs in no more and has no session or token.
ALTER TABLE users ADD COLUMN disabled_at TEXT;
