// Bundles src/ with zarrita.js into nasar_zarr/viewer/static/viewer.js (`make viewer`).
// The first line records a sha256 of the sources and the lock file, so that a test can
// tell a stale bundle from a fresh one without node (tests/test_viewer.py).
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { build } from "esbuild";

const files = ["package-lock.json", ...readdirSync("src").sort().map((f) => `src/${f}`)];
const hash = createHash("sha256");
for (const file of files) {
  hash.update(`${file}\0`);
  hash.update(readFileSync(file));
  hash.update("\0");
}

await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  legalComments: "eof",
  outfile: "../nasar_zarr/viewer/static/viewer.js",
  banner: {
    js: `// nasar-zarr viewer (zarrita.js, numcodecs.js: MIT); built by \`make viewer\`; sources sha256 ${hash.digest("hex")}`,
  },
  logLevel: "info",
});
