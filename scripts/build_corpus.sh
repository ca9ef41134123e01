#!/usr/bin/env bash
# Build a poems pretraining corpus as JSONL (`{"text": title + "\n" + lines joined by "\n"}`)
# from the npm package chinese-poetry@2.0.1 (MIT, https://github.com/chinese-poetry/chinese-poetry).
#
#   scripts/build_corpus.sh OUT.jsonl                 # full corpus: ~312k poems (Tang + Song), ~75 MB
#   scripts/build_corpus.sh OUT.jsonl --tang-only     # the 57,607 Tang poems
#   scripts/build_corpus.sh OUT.jsonl --tang-only --limit 5000   # how data/poems.jsonl was made
#
# Needs npm/node (the package comes from the npm registry). Files are read in numeric order
# (poet.tang.0, poet.tang.1000, ...), poems in file order, so the output is reproducible.
# Poems with an empty title and no lines are dropped. The full corpus is not committed.
set -euo pipefail

usage() { echo "usage: $0 OUT.jsonl [--tang-only] [--limit N]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
tang_only=0; limit=0
while [ $# -gt 0 ]; do
  case $1 in
    --tang-only) tang_only=1 ;;
    --limit) shift; [ $# -gt 0 ] || usage; limit=$1 ;;
    *) usage ;;
  esac
  shift
done
command -v npm >/dev/null || { echo "npm is needed to fetch chinese-poetry@2.0.1" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent chinese-poetry@2.0.1 >/dev/null && tar xzf chinese-poetry-2.0.1.tgz)
dir="$work/package/dist/quantangshi"
[ -d "$dir" ] || { echo "unexpected package layout: $dir missing" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
DIR="$dir" TANG_ONLY=$tang_only LIMIT=$limit node - >"$out.tmp" <<'EOF'
const fs = require('fs'), path = require('path');
const dir = process.env.DIR, tangOnly = process.env.TANG_ONLY === '1', limit = +process.env.LIMIT;
const kinds = tangOnly ? ['tang'] : ['tang', 'song'];
let n = 0;
outer: for (const kind of kinds) {
  const re = new RegExp(`^poet\\.${kind}\\.(\\d+)\\.json$`);
  const files = fs.readdirSync(dir).filter(f => re.test(f))
    .sort((a, b) => +a.match(re)[1] - +b.match(re)[1]);
  for (const f of files) {
    for (const p of JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'))) {
      const lines = (p.paragraphs || []).filter(s => typeof s === 'string' && s.length > 0);
      const title = typeof p.title === 'string' ? p.title : '';
      if (!title && lines.length === 0) continue;
      process.stdout.write(JSON.stringify({ text: title + '\n' + lines.join('\n') }) + '\n');
      if (limit > 0 && ++n >= limit) break outer;
      if (limit === 0) n++;
    }
  }
}
process.stderr.write(`${n} poems\n`);
EOF
mv "$out.tmp" "$out"
echo "wrote $out ($(du -h "$out" | cut -f1))"
