#!/bin/sh
# One-shot init of the compose test bed: a CA, a certificate per node (naming its role) for
# the addresses it is reached at, an admin operator certificate for cdpctl, and the proxies' master key.
# Idempotent: keeps what a previous run created.
set -eu
S=/etc/cdp/secrets
mkdir -p "$S/pki"
[ -f "$S/pki/ca.pem" ] || cdpctl pki init --dir "$S/pki"
issue() { [ -f "$S/pki/$1.pem" ] || cdpctl pki issue --dir "$S/pki" "$@"; }
operator() { [ -f "$S/pki/$1.pem" ] || cdpctl pki issue-operator --dir "$S/pki" "$@"; }
issue coordinator --role coordinator --host 198.51.100.5 --host 198.51.100.69 --host coordinator
# the standby coordinator of the etcd variant (compose.etcd.yaml)
issue coordinator-b --role coordinator --host 198.51.100.6 --host 198.51.100.70 --host coordinator-b
issue filter-1 --role filter --host 198.51.100.10 --host filter
issue filter-2 --role filter --host 198.51.100.13 --host filter-2
issue source-proxy-1 --role source-proxy --host 198.51.100.11 --host 198.51.100.140 --host source-proxy
issue source-proxy-2 --role source-proxy --host 198.51.100.12 --host 198.51.100.142 --host source-proxy-2
issue target-proxy-1 --role target-proxy --host 198.51.100.74 --host 198.51.100.141 --host target-proxy
issue target-1 --role target --host 198.51.100.75 --host target
operator cdpctl --scope admin
[ -f "$S/pki/assignments.key" ] || cdpctl pki signing-key --dir "$S/pki"
[ -f "$S/master.key" ] || cdpctl keygen "$S/master.key"
# the daemons run as root in the test bed; keep the keys private anyway
chmod 0600 "$S"/pki/*.key "$S/master.key"
echo "secrets ready in $S"
