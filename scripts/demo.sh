#!/usr/bin/env bash
# `make demo`: PAS on its embedded defaults, accepting any calling AE, data under $1.
set -euo pipefail
home="${1:-./var}"
mkdir -p "$home"
export PAS_HOME="$home" PAS_DICOM__ACCEPT_UNKNOWN="${PAS_DICOM__ACCEPT_UNKNOWN:-true}"
port="${PAS_DICOM__PORT:-11112}"
cat <<TXT

  PAS demo: AE title PAS, DICOM port $port, data in $home

  Send a study (DCMTK):   TCP_NODELAY=1 storescu -aec PAS +sd +r localhost $port ../shared/data/ct-covid19-ny-sbu
  See what arrived:       PAS_HOME=$home .venv/bin/pas status
                          PAS_HOME=$home .venv/bin/pas studies
  Stop:                   Ctrl-C

TXT
exec .venv/bin/pas run
