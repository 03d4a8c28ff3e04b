#!/usr/bin/env bash
# Builds a Python or JavaScript plugin into a component, cached by what goes into it:
#
#     tools/build_plugin.sh python|js <app folder> <out.wasm>
#
# from the repository root (`make plugins` runs it for every such plugin). The app folder holds
# the plugin's module, `app.py` or `app.js`, and whatever else it imports from there.
#
# The cache key is a hash of the contents (and paths) of the app folder's files, the language's
# SDK, the WIT, the toolchain's pin (tools/requirements.txt for componentize-py,
# plugins/js/package-lock.json for componentize-js), the JavaScript build script and this one.
# A component is built once per key into plugins/target/<lang>/cache/<name>-<key>.wasm and then
# linked to <out.wasm>: new timestamps (a `touch`, a checkout that rewrites the files, a branch
# switched back) rebuild nothing, where a build takes 7 s or more, and any change of content
# rebuilds. The 3 newest components of each name are kept.
set -euo pipefail

usage="usage: $0 python|js <app folder> <out.wasm>"
lang=${1:?$usage} app=${2:?$usage} out=${3:?$usage}
app=${app%/}
case $lang in
python) inputs=(plugins/python/batchbox_sdk tools/requirements.txt) ;;
js) inputs=(plugins/js/batchbox_sdk.js plugins/js/componentize.mjs plugins/js/package-lock.json) ;;
*) echo "$usage" >&2 && exit 2 ;;
esac
inputs+=("$app" wit/batchbox.wit tools/build_plugin.sh)

# Every input file's hash and path, in a stable order; Python's bytecode caches are not inputs.
key=$(find "${inputs[@]}" -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -c1-16)
name=$(basename "$out" .wasm)
cache=plugins/target/$lang/cache/$name-$key.wasm

if [[ -f $cache ]]; then
    echo "$out: cached ($cache)"
else
    echo "$out: building $cache"
    mkdir -p "$(dirname "$cache")"
    case $lang in
    python)
        .venv/bin/componentize-py -d wit/batchbox.wit -w described-plugin componentize \
            -p plugins/python -p "$app" app -o "$cache.$$.tmp"
        ;;
    js) node plugins/js/componentize.mjs "$app/app.js" "$cache.$$.tmp" ;;
    esac
    # Renamed when whole, so an interrupted build leaves no entry behind (and `$$`, this shell's
    # process id, keeps two builds at once apart).
    mv -f "$cache.$$.tmp" "$cache"
    # shellcheck disable=SC2012 # the names are ours: no spaces or newlines
    ls -t "plugins/target/$lang/cache/$name"-????????????????.wasm | tail -n +4 | xargs -r rm -f --
fi
# A hard link, swapped in by a rename: a server starting meanwhile reads the old file or the new.
mkdir -p "$(dirname "$out")"
if [[ ! $out -ef $cache ]]; then
    ln -f "$cache" "$out.$$.tmp"
    mv -f "$out.$$.tmp" "$out"
fi
