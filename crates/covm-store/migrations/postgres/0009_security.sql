-- Security (issue 16). The certificate a node's replica is trusted by when it serves TLS (its own CA,
-- or the root end of the operator's chain), so that replicas forward to each other over TLS.
ALTER TABLE nodes ADD COLUMN ca_pem TEXT;
