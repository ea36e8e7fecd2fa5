"""The per-merchant sidecar baseline: one small Python process per merchant.

This is the shape an integrator builds when each merchant's POS server carries its own token
helper: a stdlib-only loop that logs in once per scope, writes each token to a file (temp
file and rename), and refreshes at half the lifetime. No caps, no state file, no metrics:
deliberately small, so the comparison is fair to it.

usage: python sidecar.py TOKEN_URL CLIENT_ID USERNAME PASSWORD_FILE OUT_DIR SCOPE_URI...
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def grant(url: str, form: dict[str, str]) -> dict[str, object]:
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=30) as resp:
        answer: dict[str, object] = json.loads(resp.read())
        return answer


def keep(url: str, client: str, user: str, password: str, out: str, scope: str) -> None:
    name = scope.rsplit("/", 1)[-1]
    path = os.path.join(out, f"{name}.json")
    base = {"client_id": client, "scope": f"{scope} offline_access", "response_type": "token"}
    refresh = None
    while True:
        try:
            if refresh is None:
                form = {**base, "grant_type": "password", "username": user, "password": password}
            else:
                form = {**base, "grant_type": "refresh_token", "refresh_token": refresh}
            answer = grant(url, form)
        except (urllib.error.URLError, OSError, ValueError):
            refresh = None
            time.sleep(1)
            continue
        refresh = str(answer.get("refresh_token") or "") or None
        lifetime = float(str(answer["expires_in"]))
        doc = {"access_token": answer["access_token"], "token_type": "Bearer", "scope": name}
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(path + ".tmp", path)
        time.sleep(lifetime / 2)


def main(argv: list[str]) -> None:
    url, client, user, password_file, out, *scopes = argv
    with open(password_file) as f:
        password = f.read()
    os.makedirs(out, exist_ok=True)
    threads = [
        threading.Thread(target=keep, args=(url, client, user, password, out, s), daemon=True)
        for s in scopes
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1:])
