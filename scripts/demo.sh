#!/usr/bin/env bash
# `make demo`: a local regional hub (embedded archive) and PAS enrolled to it, accepting any
# calling AE; appliance data under $1, the hub's under $PAS_HUB_HOME (default: $1-hub).
set -euo pipefail
home="${1:-./var}"
mkdir -p "$home"
export PAS_HOME="$home" PAS_DICOM__ACCEPT_UNKNOWN="${PAS_DICOM__ACCEPT_UNKNOWN:-true}"
# A study leaves 10 s after its last image in the demo (60 s on an appliance: docs/routing.md).
export PAS_STUDY__STABLE_AFTER_S="${PAS_STUDY__STABLE_AFTER_S:-10}"
port="${PAS_DICOM__PORT:-11112}"
http_port="${PAS_HTTP__PORT:-8080}"
PAS=.venv/bin/pas

# The regional hub, on loopback only (hub engineer's part of the demo).
hub_home="${PAS_HUB_HOME:-${home%/}-hub}"
hub_port="${PAS_HUB_HTTP__PORT:-8443}"
export PAS_HUB_HOME="$hub_home" PAS_HUB_HTTP__HOST=127.0.0.1 PAS_HUB_HTTP__PORT="$hub_port"
[ -f "$hub_home/ca.crt" ] || $PAS hub init >/dev/null
$PAS hub run >>"$hub_home/hub.log" 2>&1 &
hub_pid=$!
trap 'kill "$hub_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$hub_port") 2>/dev/null && break
  kill -0 "$hub_pid" 2>/dev/null || { echo "hub did not start:"; tail -5 "$hub_home/hub.log"; exit 1; }
  sleep 0.1
done
# The site's name, where pas run and pas status from another shell both read it
# ($PAS_HOME/appliance.toml): the name it enrols under, not the default "PAS".
[ -f "$home/appliance.toml" ] || printf '# Written by make demo.\nsite = "DEMO"\n' >"$home/appliance.toml"
if [ ! -f "$home/pki/hub.json" ]; then
  # The token goes through a pipe: never on a command line, where `ps` shows it.
  $PAS hub token DEMO | $PAS enroll --hub "https://localhost:$hub_port" --token -
fi

cat <<TXT

  PAS demo: AE title PAS, DICOM port $port, data in $home
  A study is sent to the region ${PAS_STUDY__STABLE_AFTER_S} s after its last image.
  Regional hub: https://localhost:$hub_port (embedded archive in $hub_home/archive)

  Send a study (DCMTK):   TCP_NODELAY=1 storescu -aec PAS +sd +r localhost $port ../shared/data/ct-covid19-ny-sbu
  See what arrived:       PAS_HOME=$home $PAS status
                          http://localhost:$http_port/ (status page: cache, queue, region link)
                          PAS_HOME=$home $PAS studies
  On the regional side:   PAS_HUB_HOME=$hub_home $PAS hub transfers
                          PAS_HOME=$hub_home/archive $PAS studies
                          curl --cert $home/pki/client.crt --key $home/pki/client.key --cacert $home/pki/ca.crt \\
                            https://localhost:$hub_port/api/v1/region/dicom-web/studies
  Stop:                   Ctrl-C

TXT
$PAS run
