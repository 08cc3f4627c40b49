# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_pingate_global_optspecs
    string join \n log-format= log-level= h/help V/version
end

function __fish_pingate_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_pingate_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_pingate_using_subcommand
    set -l cmd (__fish_pingate_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c pingate -n "__fish_pingate_needs_command" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_needs_command" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_needs_command" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_needs_command" -s V -l version -d 'Print version'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "audit" -d 'Check the inventory\'s invariants, reconcile gateways\' journals with it, report a day\'s sales'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "check-config" -d 'Check a gateway configuration (or a PIN server\'s gateway list) and print every problem with its location'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "replay" -d 'Replay a capture file against a gateway (answers compared field by field), or offline against the codec'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "iso" -d 'Decode, encode and list ISO 8583 dialects'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "server" -d 'Run the PIN server: the inventory, served to gateways over mutual TLS'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "certs" -d 'Certificates for mutual TLS'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "terminals" -d 'Terminals\' MAC keys (`pingate terminals key generate|import|rotate|show-kcv`), and terminals locked for bad MACs at a running gateway (`status`, `unlock`)'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "pins" -d 'Manage the PIN inventory: products, imports, stock, leases'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "limits" -d 'Merchants\' limits kept by the PIN server across gateways (`set`, `show`)'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "gateway" -d 'Run the gateway (`pingate gateway --config gateway.toml`), or ask a running one (`pingate gateway stock`)'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "demo" -d 'Everything in one process with no setup: certificates, a SQLite inventory, a PIN server, a gateway, and simulated terminals buying PINs; prints a report'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "completions" -d 'A shell completion script for `pingate`, on standard output (e.g. `pingate completions bash > /usr/share/bash-completion/completions/pingate`)'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "man" -d 'Manual pages of `pingate` and of each of its commands (`pingate.1`, `pingate-gateway.1`, `pingate-gateway-stock.1`, …), written into a folder (e.g. /usr/share/man/man1)'
complete -c pingate -n "__fish_pingate_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l db -d 'Inventory: sqlite:PATH or postgres://USER@HOST:PORT/DB (opened read-only)' -r
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l journal -d 'A gateway journal to reconcile: `ID,PATH,KEYFILE` (its gateway id, the journal, its journal key file); repeat for each gateway' -r
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l day -d 'Report this day\'s sales and reversals (`YYYY-MM-DD`, UTC)' -r
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l csv -d 'Also write the report as CSV' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand audit" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand audit" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand check-config" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand check-config" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand check-config" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l gateway -d 'The gateway\'s terminal listener (framing and TPDU as the capture says)' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l pace -d '`original`: keep the captured time between requests; `fast`: as fast as answers come' -r -f -a "original\t''
fast\t''"
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l may-differ -d 'Fields that must only be present in both answers or absent in both (comma separated)' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l ignore -d 'Fields not compared at all (comma separated)' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l timeout-ms -d 'Time allowed for each answer, in milliseconds' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l ca -d 'The CA certificate that issued the listener\'s certificate (with --tls)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l cert -d 'A client certificate to present (a terminal\'s or a NAC\'s, from `pingate certs terminal`)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l key -d 'The client certificate\'s private key' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l server-name -d 'The name the listener\'s certificate must carry' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l mac-key-file -d 'Sign requests with the terminals\' MAC keys from this terminal key file (and check the answers\' MACs)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l kek-file -d 'The key-encrypting key the terminal key file is sealed under' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l offline -d 'Against the codec alone: decode and re-encode every frame'
complete -c pingate -n "__fish_pingate_using_subcommand replay" -l tls -d 'Connect with TLS (the listener\'s certificate checked against --ca)'
complete -c pingate -n "__fish_pingate_using_subcommand replay" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -f -a "decode" -d 'Decode a hex message (argument, or stdin with `-` or nothing) and print it as JSON'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -f -a "encode" -d 'Encode a message given as JSON (argument, or stdin) and print it as hex'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -f -a "dialects" -d 'List the dialects available'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and not __fish_seen_subcommand_from decode encode dialects help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l dialect -d 'Dialect name (see `pingate iso dialects`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l protocols -d 'Directory with user dialects in `iso8583/*.toml` (default: ./protocols, or $PINGATE_PROTOCOLS)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l reveal -d 'Show sensitive fields (PIN data, PAN, track data, MACs) instead of masking them'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -l pretty -d 'A table with field names instead of JSON'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from decode" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from encode" -l dialect -d 'Dialect name (see `pingate iso dialects`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from encode" -l protocols -d 'Directory with user dialects in `iso8583/*.toml` (default: ./protocols, or $PINGATE_PROTOCOLS)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from encode" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from encode" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from encode" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from dialects" -l protocols -d 'Directory with user dialects in `iso8583/*.toml`' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from dialects" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from dialects" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from dialects" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from help" -f -a "decode" -d 'Decode a hex message (argument, or stdin with `-` or nothing) and print it as JSON'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from help" -f -a "encode" -d 'Encode a message given as JSON (argument, or stdin) and print it as hex'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from help" -f -a "dialects" -d 'List the dialects available'
complete -c pingate -n "__fish_pingate_using_subcommand iso; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand server" -l db -d 'Inventory: sqlite:PATH or postgres://USER@HOST:PORT/DB' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l listen -d 'Address to listen on' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l cert -d 'Server certificate (PEM, chain)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand server" -l key -d 'Server private key (PEM)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand server" -l client-ca -d 'CA that issues gateway certificates (PEM)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand server" -l gateways -d 'Gateway list: `id = "sha256 of its certificate"` per line' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand server" -l pin-keys -d 'File with the PIN encryption keys (`id:64-hex` entries); else $PINGATE_PIN_KEYS or $PINGATE_PIN_KEY_FILE' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-connections -d 'Most gateway connections at once (TLS handshake done with a listed certificate); more are closed' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-unauthenticated -d 'Most connections not authenticated yet (TLS handshake or hello under way); a new one past it closes the oldest of them. Gateway connections do not count' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-unauthenticated-per-source -d 'The same from one source address: a new one past it closes the oldest of that address' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l handshake-timeout-ms -d 'Milliseconds a new connection has for its TLS handshake and its hello, together; then it is closed' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l repeat-age-secs -d 'A repeat (0201, or a duplicate 0200) of a sale older than this gets no PIN (`repeat_expired`, 12 to the terminal): a receipt\'s STAN and time, or a capture replayed later, gives back nothing. 60 to 2592000 (30 days)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l reversal-window-secs -d 'A terminal\'s reversal received more than this many seconds after its sale is refused (21 to the terminal) and the PIN stays sold (60 to 604800; no window when absent). Gateways\' own reversals of answers that did not reach the terminal are never refused' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-in-flight -d 'Requests in flight on one connection; more are answered `busy` (1 to 4096; a gateway sends up to 200)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-frame -d 'Largest request frame in bytes; a larger one closes the connection (131072, the protocol\'s largest request frame, to 16777216)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l idle-timeout-secs -d 'A connection with nothing in flight and no request for this many seconds is closed (30 to 86400; above the gateways\' ping_every_ms)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l max-lease-secs -d 'Longest lease a gateway may ask for on reserved PINs, in seconds (60 to 604800; at least the gateways\' lease_secs)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l pg-connections -d 'PostgreSQL connections used by this server (each commits batches of requests; on 2 cores, 2 is best; 1 to 64)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l metrics -d 'Serve Prometheus metrics, /healthz and /readyz over HTTP here (e.g. 127.0.0.1:9585); off by default' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand server" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand server" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -f -a "init" -d 'Create a private CA, a server certificate, gateway certificates, the gateway list and a PIN key file: the CA in DIR/ca (its key to keep offline), and one folder per host with only what it deploys (DIR/server, DIR/gateway-ID)'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -f -a "terminal" -d 'Issue a certificate with the CA of a `certs init` folder (its `ca/ca.key` at hand): a terminal\'s or a NAC\'s client certificate (CN = the terminal id, or the NAC\'s name in `[[nac]]`), or with `--listener` the server certificate of a gateway\'s TLS terminal listener. Writes OUT/NAME.pem, OUT/NAME.key (0600) and OUT/ca.pem'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -f -a "key" -d 'Write a new encryption key file (`1:64-hex`, mode 0600; never overwrites): e.g. a gateway\'s journal key'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and not __fish_seen_subcommand_from init terminal key help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -l gateway -d 'Gateway ids to issue client certificates for' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -l server-name -d 'Names (DNS or IP) of the server certificate' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -l days -d 'Validity in days' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from init" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l name -d 'The certificate\'s name(s): the first is its CN; all are subject alternative names' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l out -d 'Where to write (default: DIR/terminals)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l days -d 'Validity in days' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -l listener -d 'A TLS listener\'s server certificate (names: DNS names or IP addresses terminals connect to)'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from terminal" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from key" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from key" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from key" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from help" -f -a "init" -d 'Create a private CA, a server certificate, gateway certificates, the gateway list and a PIN key file: the CA in DIR/ca (its key to keep offline), and one folder per host with only what it deploys (DIR/server, DIR/gateway-ID)'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from help" -f -a "terminal" -d 'Issue a certificate with the CA of a `certs init` folder (its `ca/ca.key` at hand): a terminal\'s or a NAC\'s client certificate (CN = the terminal id, or the NAC\'s name in `[[nac]]`), or with `--listener` the server certificate of a gateway\'s TLS terminal listener. Writes OUT/NAME.pem, OUT/NAME.key (0600) and OUT/ca.pem'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from help" -f -a "key" -d 'Write a new encryption key file (`1:64-hex`, mode 0600; never overwrites): e.g. a gateway\'s journal key'
complete -c pingate -n "__fish_pingate_using_subcommand certs; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -f -a "key" -d 'Terminals\' MAC keys: generate, import, rotate, show key check values'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -f -a "status" -d 'Terminals with bad or missing MACs since a running gateway started, and which of them are locked'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -f -a "unlock" -d 'Unlock a terminal that a running gateway locked after too many bad or missing MACs'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and not __fish_seen_subcommand_from key status unlock help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -f -a "generate" -d 'Give a terminal its first MAC key, made at random; prints its key id and KCV'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -f -a "import" -d 'Give a terminal its first MAC key, read as hex from standard input (never from the command line)'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -f -a "rotate" -d 'Give a terminal a new key (at random, or from standard input with --import): it signs answers from now on, and requests MACed with the terminal\'s older keys still verify during the grace period'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -f -a "show-kcv" -d 'Print the key check values of the terminals\' keys (of one terminal with --terminal), to compare with what a terminal shows for the key loaded into it. Needs no KEK; with --kek each key is opened and its KCV computed again'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from key" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from status" -l admin -d 'The gateway\'s admin socket (`admin` in its configuration): a Unix socket path, or IP:port' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from status" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from status" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from unlock" -l admin -d 'The gateway\'s admin socket (`admin` in its configuration): a Unix socket path, or IP:port' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from unlock" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from unlock" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from unlock" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from help" -f -a "key" -d 'Terminals\' MAC keys: generate, import, rotate, show key check values'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from help" -f -a "status" -d 'Terminals with bad or missing MACs since a running gateway started, and which of them are locked'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from help" -f -a "unlock" -d 'Unlock a terminal that a running gateway locked after too many bad or missing MACs'
complete -c pingate -n "__fish_pingate_using_subcommand terminals; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "product" -d 'Add a product (or update it) with its denominations'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "import" -d 'Load PINs from CSV (`product,amount,pin,serial,expiry,receipt`, header first; receipt lines separated by `|`). All or nothing: any bad row rejects the file, naming its line'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "stock" -d 'Stock per product and denomination, by state'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "leases" -d 'Reservations whose lease has ended, per gateway (never freed by themselves)'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "return-expired" -d 'Return a gateway\'s expired reservations to stock, once its journal is reconciled or it holds none'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "return-quarantined" -d 'Return a quarantined PIN (its row did not decrypt) to stock once its row is repaired: refused unless it now opens with the PIN keys'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "quarantine" -d 'Take an available PIN out of sale (quarantine it) on your word, e.g. a damaged row whose key id names a key nobody has (the server refuses to start while one is in stock). Undone by `return-quarantined`'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "conflicts" -d 'List the cached sales the PIN server could not confirm (their key was already sold with another PIN: the PIN was handed out and voided), open ones first; `--resolve ID --note TEXT` closes one once you have dealt with it (billed the merchant, had the supplier deactivate the PIN...). `pingate audit` fails while one is open'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "voided" -d 'PINs voided by reversals since a time, for the supplier\'s deactivation: serial, product, amount, currency, when reversed, gateway, terminal, merchant and why (never a PIN). Voids whose answer was sent whole but never acknowledged (the terminal may have printed the PIN) are left out unless `--include-unacknowledged`'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and not __fish_seen_subcommand_from product import stock leases return-expired return-quarantined quarantine conflicts voided help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l code -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l name -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l supplier -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l currency -d 'ISO 4217 numeric currency code' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l amounts -d 'Denominations in minor units, comma-separated' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from product" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from import" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from import" -l pin-keys -d 'File with the PIN encryption keys (`id:64-hex` entries); else $PINGATE_PIN_KEYS or $PINGATE_PIN_KEY_FILE' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from import" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from import" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from import" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from stock" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from stock" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from stock" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from stock" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from leases" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from leases" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from leases" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from leases" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-expired" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-expired" -l gateway -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-expired" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-expired" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-expired" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -l pin-keys -d 'File with the PIN encryption keys (`id:64-hex` entries); else $PINGATE_PIN_KEYS or $PINGATE_PIN_KEY_FILE' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -l id -d 'The PIN\'s id (`pingate audit` lists the quarantined ones)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from return-quarantined" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from quarantine" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from quarantine" -l id -d 'The PIN\'s id' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from quarantine" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from quarantine" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from quarantine" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -l resolve -d 'Close this conflict (its id as listed)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -l note -d 'What was done about it (kept with the conflict)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from conflicts" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l since -d '`YYYY-MM-DD` (UTC midnight), `YYYY-MM-DDTHH:MM:SSZ`, or seconds since the epoch' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l csv -d 'CSV with a header line instead of text'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -l include-unacknowledged -d 'Also list the unacknowledged voids (marked `unacknowledged`): do not deactivate those on a guess'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from voided" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "product" -d 'Add a product (or update it) with its denominations'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "import" -d 'Load PINs from CSV (`product,amount,pin,serial,expiry,receipt`, header first; receipt lines separated by `|`). All or nothing: any bad row rejects the file, naming its line'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "stock" -d 'Stock per product and denomination, by state'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "leases" -d 'Reservations whose lease has ended, per gateway (never freed by themselves)'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "return-expired" -d 'Return a gateway\'s expired reservations to stock, once its journal is reconciled or it holds none'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "return-quarantined" -d 'Return a quarantined PIN (its row did not decrypt) to stock once its row is repaired: refused unless it now opens with the PIN keys'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "quarantine" -d 'Take an available PIN out of sale (quarantine it) on your word, e.g. a damaged row whose key id names a key nobody has (the server refuses to start while one is in stock). Undone by `return-quarantined`'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "conflicts" -d 'List the cached sales the PIN server could not confirm (their key was already sold with another PIN: the PIN was handed out and voided), open ones first; `--resolve ID --note TEXT` closes one once you have dealt with it (billed the merchant, had the supplier deactivate the PIN...). `pingate audit` fails while one is open'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "voided" -d 'PINs voided by reversals since a time, for the supplier\'s deactivation: serial, product, amount, currency, when reversed, gateway, terminal, merchant and why (never a PIN). Voids whose answer was sent whole but never acknowledged (the terminal may have printed the PIN) are left out unless `--include-unacknowledged`'
complete -c pingate -n "__fish_pingate_using_subcommand pins; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -f -a "set" -d 'Set a merchant\'s value per UTC day in a currency (minor units: `--currency` and `--value-per-day`), or its sales per minute (`--sales-per-minute`, fixed minutes of the PIN server\'s clock); or remove one (`--remove` with `--currency`: the value limit in that currency; `--remove` alone: the sales per minute). Gateways with a `merchant_allowance` in that currency, or a `merchant_sales_allowance`, sell from slices of them'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -f -a "show" -d 'Every merchant\'s limit and what gateways were granted of it today (UTC), or in this minute for sales per minute'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and not __fish_seen_subcommand_from set show help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l merchant -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l currency -d 'ISO 4217 numeric' -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l value-per-day -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l sales-per-minute -d 'Sales a minute across every gateway (0 to 100000; 0: none)' -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -l remove
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from set" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from show" -l db -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from show" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from show" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from help" -f -a "set" -d 'Set a merchant\'s value per UTC day in a currency (minor units: `--currency` and `--value-per-day`), or its sales per minute (`--sales-per-minute`, fixed minutes of the PIN server\'s clock); or remove one (`--remove` with `--currency`: the value limit in that currency; `--remove` alone: the sales per minute). Gateways with a `merchant_allowance` in that currency, or a `merchant_sales_allowance`, sell from slices of them'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from help" -f -a "show" -d 'Every merchant\'s limit and what gateways were granted of it today (UTC), or in this minute for sales per minute'
complete -c pingate -n "__fish_pingate_using_subcommand limits; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -l config -d 'Configuration file (see protocols/gateway.example.toml)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -f -a "stock" -d 'Cache levels, confirms and reversals waiting for the server, and server health of a running gateway'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -f -a "lines" -d 'Serial lines of a running gateway: state, calls, answers delivered, sales reversed, last error'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and not __fish_seen_subcommand_from stock lines help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from stock" -l admin -d 'The gateway\'s admin socket (`admin` in its configuration): a Unix socket path, or IP:port' -r
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from stock" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from stock" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from stock" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from lines" -l admin -d 'The gateway\'s admin socket (`admin` in its configuration): a Unix socket path, or IP:port' -r
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from lines" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from lines" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from lines" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "stock" -d 'Cache levels, confirms and reversals waiting for the server, and server health of a running gateway'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "lines" -d 'Serial lines of a running gateway: state, calls, answers delivered, sales reversed, last error'
complete -c pingate -n "__fish_pingate_using_subcommand gateway; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l sales -d 'Sales to make' -r
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l terminals -d 'Simulated terminals (each sells in turn; all at once)' -r
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l dir -d 'Folder to work in (default: a new temporary folder)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand demo" -l keep-running -d 'Leave the PIN server and gateway running for your own terminal, until Ctrl-C'
complete -c pingate -n "__fish_pingate_using_subcommand demo" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand completions" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand completions" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand completions" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand man" -l out -d 'Folder to write the pages into (created if missing)' -r -F
complete -c pingate -n "__fish_pingate_using_subcommand man" -l log-format -d 'Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line) for log collectors' -r -f -a "text\t''
json\t''"
complete -c pingate -n "__fish_pingate_using_subcommand man" -l log-level -d 'Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway configuration\'s `log`, else `info`)' -r
complete -c pingate -n "__fish_pingate_using_subcommand man" -s h -l help -d 'Print help'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "audit" -d 'Check the inventory\'s invariants, reconcile gateways\' journals with it, report a day\'s sales'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "check-config" -d 'Check a gateway configuration (or a PIN server\'s gateway list) and print every problem with its location'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "replay" -d 'Replay a capture file against a gateway (answers compared field by field), or offline against the codec'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "iso" -d 'Decode, encode and list ISO 8583 dialects'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "server" -d 'Run the PIN server: the inventory, served to gateways over mutual TLS'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "certs" -d 'Certificates for mutual TLS'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "terminals" -d 'Terminals\' MAC keys (`pingate terminals key generate|import|rotate|show-kcv`), and terminals locked for bad MACs at a running gateway (`status`, `unlock`)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "pins" -d 'Manage the PIN inventory: products, imports, stock, leases'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "limits" -d 'Merchants\' limits kept by the PIN server across gateways (`set`, `show`)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "gateway" -d 'Run the gateway (`pingate gateway --config gateway.toml`), or ask a running one (`pingate gateway stock`)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "demo" -d 'Everything in one process with no setup: certificates, a SQLite inventory, a PIN server, a gateway, and simulated terminals buying PINs; prints a report'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "completions" -d 'A shell completion script for `pingate`, on standard output (e.g. `pingate completions bash > /usr/share/bash-completion/completions/pingate`)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "man" -d 'Manual pages of `pingate` and of each of its commands (`pingate.1`, `pingate-gateway.1`, `pingate-gateway-stock.1`, …), written into a folder (e.g. /usr/share/man/man1)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and not __fish_seen_subcommand_from audit check-config replay iso server certs terminals pins limits gateway demo completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from iso" -f -a "decode" -d 'Decode a hex message (argument, or stdin with `-` or nothing) and print it as JSON'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from iso" -f -a "encode" -d 'Encode a message given as JSON (argument, or stdin) and print it as hex'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from iso" -f -a "dialects" -d 'List the dialects available'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from certs" -f -a "init" -d 'Create a private CA, a server certificate, gateway certificates, the gateway list and a PIN key file: the CA in DIR/ca (its key to keep offline), and one folder per host with only what it deploys (DIR/server, DIR/gateway-ID)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from certs" -f -a "terminal" -d 'Issue a certificate with the CA of a `certs init` folder (its `ca/ca.key` at hand): a terminal\'s or a NAC\'s client certificate (CN = the terminal id, or the NAC\'s name in `[[nac]]`), or with `--listener` the server certificate of a gateway\'s TLS terminal listener. Writes OUT/NAME.pem, OUT/NAME.key (0600) and OUT/ca.pem'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from certs" -f -a "key" -d 'Write a new encryption key file (`1:64-hex`, mode 0600; never overwrites): e.g. a gateway\'s journal key'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from terminals" -f -a "key" -d 'Terminals\' MAC keys: generate, import, rotate, show key check values'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from terminals" -f -a "status" -d 'Terminals with bad or missing MACs since a running gateway started, and which of them are locked'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from terminals" -f -a "unlock" -d 'Unlock a terminal that a running gateway locked after too many bad or missing MACs'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "product" -d 'Add a product (or update it) with its denominations'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "import" -d 'Load PINs from CSV (`product,amount,pin,serial,expiry,receipt`, header first; receipt lines separated by `|`). All or nothing: any bad row rejects the file, naming its line'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "stock" -d 'Stock per product and denomination, by state'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "leases" -d 'Reservations whose lease has ended, per gateway (never freed by themselves)'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "return-expired" -d 'Return a gateway\'s expired reservations to stock, once its journal is reconciled or it holds none'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "return-quarantined" -d 'Return a quarantined PIN (its row did not decrypt) to stock once its row is repaired: refused unless it now opens with the PIN keys'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "quarantine" -d 'Take an available PIN out of sale (quarantine it) on your word, e.g. a damaged row whose key id names a key nobody has (the server refuses to start while one is in stock). Undone by `return-quarantined`'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "conflicts" -d 'List the cached sales the PIN server could not confirm (their key was already sold with another PIN: the PIN was handed out and voided), open ones first; `--resolve ID --note TEXT` closes one once you have dealt with it (billed the merchant, had the supplier deactivate the PIN...). `pingate audit` fails while one is open'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from pins" -f -a "voided" -d 'PINs voided by reversals since a time, for the supplier\'s deactivation: serial, product, amount, currency, when reversed, gateway, terminal, merchant and why (never a PIN). Voids whose answer was sent whole but never acknowledged (the terminal may have printed the PIN) are left out unless `--include-unacknowledged`'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from limits" -f -a "set" -d 'Set a merchant\'s value per UTC day in a currency (minor units: `--currency` and `--value-per-day`), or its sales per minute (`--sales-per-minute`, fixed minutes of the PIN server\'s clock); or remove one (`--remove` with `--currency`: the value limit in that currency; `--remove` alone: the sales per minute). Gateways with a `merchant_allowance` in that currency, or a `merchant_sales_allowance`, sell from slices of them'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from limits" -f -a "show" -d 'Every merchant\'s limit and what gateways were granted of it today (UTC), or in this minute for sales per minute'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from gateway" -f -a "stock" -d 'Cache levels, confirms and reversals waiting for the server, and server health of a running gateway'
complete -c pingate -n "__fish_pingate_using_subcommand help; and __fish_seen_subcommand_from gateway" -f -a "lines" -d 'Serial lines of a running gateway: state, calls, answers delivered, sales reversed, last error'
