// Validates glTF/GLB files with the Khronos validator; prints one JSON report per file.
// Usage: node validate_gltf.mjs FILE...   (exit code 0 even with issues: the caller judges)
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

const reports = {};
for (const path of process.argv.slice(2)) {
  const bytes = new Uint8Array(await readFile(path));
  const report = await validator.validateBytes(bytes, { maxIssues: 50 });
  reports[path] = {
    numErrors: report.issues.numErrors,
    numWarnings: report.issues.numWarnings,
    messages: report.issues.messages,
    info: report.info,
  };
}
process.stdout.write(JSON.stringify(reports));
