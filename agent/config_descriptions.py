"""What each config field means, for the reference :mod:`agent.config_docs` generates.

A field's own ``Field(description=...)`` wins over an entry here; the test of
the reference fails for a field with neither, and for an entry that names no
field. Kept apart from the generator: this is prose, edited with the model.
"""

from __future__ import annotations

#: Defaults that depend on the machine (uid, environment), written as rules.
DEFAULTS = {
    "listen.socket": "as root `/run/secrets-agent/agent.sock`; else "
    "`$XDG_RUNTIME_DIR/secrets-agent/agent.sock`; else `~/.cache/secrets-agent/agent.sock` "
    "(never a predictable path under `/tmp`)",
    "access": "`[{secrets: ['*'], uids: [<the agent's uid>]}]`",
    "keys": "`{local: {type: local}}`",
    "store": "`{type: file}`",
}

#: The meaning of each field (``<name>`` stands for a key of a mapping,
#: ``[]`` for an item of a list). A field's own ``description`` wins.
DESCRIPTIONS = {
    "listen": "The API's listeners.",
    "listen.socket": "The HTTP API's Unix socket. Its directory is created `0711`; it and "
    "every directory above it must be owned by the agent's uid or root and writable by no one "
    "else (sticky parents such as `/tmp` excepted); a refusal names the path, owner, mode and "
    "fix. A stale socket is removed; another live agent on the path is an error. At most "
    "107 bytes.",
    "listen.shared_volume": "The socket directory's parent is a volume shared within one "
    "trust boundary (a pod's `emptyDir`, mode 0777): the agent creates the socket directory "
    "there (`0711`) and verifies it owns it (see security.md, Directories).",
    "listen.socket_mode": "Mode set right after bind (the socket is created `0600` first).",
    "listen.socket_group": "Group (name or gid) given the socket.",
    "listen.max_connections": "Requests in flight on the socket; beyond it, 429.",
    "listen.tcp": "Optional loopback TCP listener, compatible with the AWS Secrets Manager Agent.",
    "listen.tcp.address": "Loopback only (`127.0.0.1`, `[::1]`, `localhost`); anything else "
    "is refused.",
    "listen.tcp.tokens": "Token name to reference (`file:///...` or `env:VAR`); every TCP "
    "request but `/healthz` and `/ping` needs one.",
    "listen.tcp.max_connections": "Requests in flight on TCP; beyond it, 429.",
    "listen.tcp.aws_path_prefix": "Prefix of the AWS-agent path style `GET /v1/<name>`.",
    "listen.tcp.token_headers": "Request headers that may carry the token (the AWS agent's "
    "`ssrf_headers`; its defaults are the last two).",
    "metrics": "The Prometheus endpoint.",
    "metrics.listen": "TCP address serving `/metrics` only; `null` to serve metrics on the "
    "socket alone.",
    "keys": "Named key providers (master keys). See [keys.md](keys.md). `{}` (none) only "
    "with a plaintext store (`aws-secretsmanager`, `client_side_encryption: false`).",
    "keys.<name>.type": "`local`, `pkcs11` or `aws-kms`.",
    "keys.<name>.keyring": "The keyring file; must be mode 0600.",
    "keys.<name>.passphrase": "Seals the keyring with scrypt + AES-GCM.",
    "keys.<name>.module": "The PKCS#11 module (`.so`).",
    "keys.<name>.token": "Token label.",
    "keys.<name>.pin": "User PIN.",
    "keys.<name>.key": "Label of the AES master key on the token.",
    "keys.<name>.mechanism": "How data keys are wrapped.",
    "keys.<name>.key_id": "KMS key id, ARN or alias.",
    "keys.<name>.region": "AWS region (default: the SDK's).",
    "keys.<name>.endpoint_url": "Another endpoint (a VPC endpoint, a test server).",
    "keys.<name>.timeout": "Per-call timeout.",
    "keys.<name>.rotate_every": "Rotate this provider's master key on a schedule "
    "([keys.md](keys.md#scheduled-rotation)). `local`, `pkcs11`: any duration of `1s` or "
    "more; `aws-kms`: whole days from `90d` to `2560d` (KMS automatic rotation).",
    "write_keys": "Providers that wrap the data key of each new envelope (one recipient "
    "each). Each must be defined under `keys`.",
    "datakeys": "The data-key caches.",
    "datakeys.cache_capacity": "Unwrapped data keys held in memory (LRU).",
    "datakeys.max_age": "A cached data key is wiped after this ...",
    "datakeys.max_uses": "... or after this many uses.",
    "datakeys.max_messages": "A writer reuses one data key for this many envelopes (or `max_age`).",
    "store": "Where envelopes live. See [stores.md](stores.md).",
    "store.type": "`file`, `etcd`, `aws-secretsmanager` or `s3`.",
    "store.accept_unproven_stages": "Serve stage maps without proof (written before proofs "
    "existed). For the upgrade only: see envelope-format.md, Stage maps and their proof.",
    "store.id": "Logical store id, bound into every envelope's context and wrap context; "
    "keep it when migrating a store.",
    "store.path": "Directory of the file store.",
    "store.endpoints": "etcd client endpoints.",
    "store.prefix": "Key prefix.",
    "store.username": "etcd user.",
    "store.password": "etcd password.",
    "store.tls": "TLS to etcd.",
    "store.tls.ca": "CA bundle that signed the server's certificate.",
    "store.tls.cert": "Client certificate.",
    "store.tls.key": "Client key.",
    "store.timeout": "Per-call timeout.",
    "store.max_object_size": "An envelope or stage map larger than this is refused before it "
    "is read whole (file: fstat; S3: Content-Length; etcd, Secrets Manager: the value size). "
    "A refused envelope leaves the last good version in service; a refused stage map is "
    "served stale. See docs/reliability.md.",
    "store.max_json_depth": "JSON in store objects nested deeper than this is refused "
    "(a genuine envelope nests 3 levels).",
    "store.region": "AWS region (default: the SDK's).",
    "store.endpoint_url": "Another endpoint (a VPC endpoint, a test server).",
    "store.client_side_encryption": "`false`: serve plain AWS secrets as AWS stores them "
    "(read only).",
    "store.name_prefix": "Prefix of AWS secret names.",
    "store.bucket": "Bucket name.",
    "secrets": "Names or globs preloaded at start and kept fresh. Others load on first read.",
    "refresh": "How secrets are kept fresh. See [refresh.md](refresh.md).",
    "refresh.interval": "Poll interval, jittered.",
    "refresh.watch_interval": "Safety-net poll while a watch is healthy.",
    "refresh.jitter": "Fraction of jitter on intervals and backoff (0-1).",
    "refresh.watch": "Use the store's push (file: inotify via watchfiles; etcd: watch).",
    "refresh.max_stale": "How long the last good value is served while the store is "
    "failing; then 503.",
    "refresh.backoff_initial": "First retry after a transient error; doubles each time ...",
    "refresh.backoff_max": "... up to this.",
    "refresh.request_min_interval": "`refresh=true` checks the store at most once per "
    "secret per this.",
    "refresh.delete_grace": "A secret deleted from the store is dropped after this.",
    "access": "Who may read what; deny by default. See [security.md](security.md).",
    "access[].secrets": "Globs over secret names.",
    "access[].uids": "Caller uids (from the socket's peer credentials).",
    "access[].gids": "Caller gids, primary or supplementary.",
    "access[].exe": "Globs over the caller's `/proc/<pid>/exe`.",
    "access[].token": "A `listen.tcp.tokens` name (TCP callers).",
    "access[].stages": (
        'Stages this rule may read; `"*"` for all; `[]`: none (the caller may list the '
        "secrets and see `status`, but reads no value: an operator's grant)"
    ),
    "templates": "Rendered files. See [rendering.md](rendering.md).",
    "templates[].name": "A short name: the `template` label of the render metrics and the "
    "name in `status` (default: the index in this list).",
    "templates[].destination": "The file (or directory, format `files`) written.",
    "templates[].secret": "The one secret rendered: a name, or `{name, stage, version}`.",
    "templates[].secrets": "The secrets a `template` reads.",
    "templates[].secret.name": "Secret name.",
    "templates[].secret.stage": "Stage to render (default `CURRENT`).",
    "templates[].secret.version": "A fixed version id instead of a stage.",
    "templates[].secrets[].name": "Secret name.",
    "templates[].secrets[].stage": "Stage to render (default `CURRENT`).",
    "templates[].secrets[].version": "A fixed version id instead of a stage.",
    "templates[].key": "One JSON field of the secret instead of the whole value.",
    "templates[].format": "Output format.",
    "templates[].template": "Inline Jinja2 template (sandboxed).",
    "templates[].template_file": "Jinja2 template file (sandboxed).",
    "templates[].mode": "File mode.",
    "templates[].owner": "Owner (name or uid; needs root).",
    "templates[].group": "Group (name or gid).",
    "templates[].allow_disk": "Allow a destination that is not on tmpfs/ramfs.",
    "templates[].on_change": "How the app learns of a new file.",
    "templates[].on_change.signal": "Signal sent (`SIGHUP`, `HUP`...).",
    "templates[].on_change.pid": "Process to signal.",
    "templates[].on_change.pid_file": "File holding the pid to signal.",
    "templates[].on_change.command": "Command run (argv list, no shell).",
    "templates[].on_change.timeout": "The command is killed after this.",
    "templates[].wait": "Debounce before notifying.",
    "templates[].wait.min": "Quiet time after the last change ...",
    "templates[].wait.max": "... but never more than this after the first.",
    "render": "Rendering-wide settings.",
    "render.allowed_dirs": "If non-empty, every destination must be under one of these.",
    "render.shared_volumes": "Volumes shared within one trust boundary (a pod's `emptyDir`): "
    "a destination's directory directly inside one is created `0711` and verified by the "
    "agent; nothing is written in the volume itself.",
    "render.cleanup_on_exit": "Remove rendered files on graceful shutdown.",
    "rotation": "Scheduled rotations.",
    "rotation[].secret": "The secret rotated.",
    "rotation[].every": "Interval between rotations (at least `1s`; slots aligned to the "
    "epoch). Give `every` or `cron`.",
    "rotation[].cron": "A cron expression (UTC; 5 fields, or 6 with seconds last).",
    "rotation[].window": "A rotation may start this long after its slot begins, no later.",
    "rotation[].flag_after_failures": "Failed attempts in a row after which `/v1/status` "
    "flags the secret.",
    "rotation[].rotator": "A registered rotator (`random`, `postgres`, `command`).",
    "rotation[].params": "The rotator's parameters.",
    "retention": "How many old versions the store keeps.",
    "retention.keep_unstaged": "Unstaged versions kept per secret, newest first (staged ones "
    "are always kept); `null` for no limit. Every `put`, `import` and rotation prunes the "
    "secret it wrote; `secrets-agent prune` prunes on demand.",
    "retention.max_age": "Also prune unstaged versions older than this (e.g. `90d`).",
    "audit": "The audit log. See [security.md](security.md).",
    "audit.path": "Hash-chained JSON-lines audit log: a file (relative: to the config's "
    "directory), `-` for stdout, `null` for none. `init` writes `-`, which works on a "
    "read-only root with a read-only config mount. With `-`, CLI commands that audit "
    "(`delete`, `restore`, `rotate`, `keys`) write their records to stderr.",
    "log": "Logging (stderr).",
    "log.level": "Minimum level.",
    "log.format": "`text`, or `json` (one object per line).",
}
