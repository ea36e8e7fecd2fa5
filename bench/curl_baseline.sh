#!/bin/sh
# The cron-job baseline: what an integrator writes instead of running anybilld.
#
# Reads lines "MERCHANT SCOPE_URI USERNAME PASSWORD_FILE" on stdin and, for each token set,
# one after another: a refresh grant if a refresh token was kept by an earlier run, else a
# password grant, with curl; the answer picked apart with jq; the access token written to
# OUT_DIR/MERCHANT/SCOPE.json and the refresh token to STATE_DIR/MERCHANT/SCOPE with plain
# file writes (a temp file and mv, no fsync, as such scripts usually do).
#
# usage: curl_baseline.sh TOKEN_URL CLIENT_ID OUT_DIR STATE_DIR < token-sets
set -eu
url=$1 client=$2 out=$3 state=$4
fails=0
while read -r merchant scope user pwfile; do
    name=${scope##*/}
    mkdir -p "$out/$merchant" "$state/$merchant"
    rt="$state/$merchant/$name"
    if [ -s "$rt" ]; then
        answer=$(curl -sS -X POST "$url" -d grant_type=refresh_token -d "client_id=$client" \
            -d "scope=$scope offline_access" -d response_type=token --data-urlencode "refresh_token@$rt") || answer=""
    else
        answer=$(curl -sS -X POST "$url" -d grant_type=password -d "client_id=$client" \
            --data-urlencode "username=$user" --data-urlencode "password@$pwfile" \
            -d "scope=$scope offline_access" -d response_type=token) || answer=""
    fi
    if ! token=$(printf '%s' "$answer" | jq -er '{access_token, token_type: "Bearer",
            expires_in: (.expires_in | tonumber), merchant: $m, scope: $s}' \
            --arg m "$merchant" --arg s "$name"); then
        fails=$((fails + 1))
        continue
    fi
    printf '%s' "$token" > "$out/$merchant/$name.json.tmp"
    mv "$out/$merchant/$name.json.tmp" "$out/$merchant/$name.json"
    printf '%s' "$answer" | jq -jr '.refresh_token // empty' > "$rt.tmp"
    mv "$rt.tmp" "$rt"
done
echo "failed: $fails"
