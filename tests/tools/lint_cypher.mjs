// Lint Cypher statements with Neo4j's own linter (@neo4j-cypher/language-support).
// stdin: {"schema": {...DbSchema}, "queries": ["...", ...]}
// stdout: one JSON array, per query the diagnostics other than undeclared-parameter notes.
// The linter is installed by scripts/setup.sh under .tools/cypher-lint (CYPHER_LINT_HOME).
import { createRequire } from 'node:module';

const require = createRequire(`${process.env.CYPHER_LINT_HOME}/`);
const { lintCypherQuery, isNotParamError } = require('@neo4j-cypher/language-support');

let input = '';
for await (const chunk of process.stdin) input += chunk;
const { schema, queries } = JSON.parse(input);
const results = queries.map((query) => ({
  query,
  diagnostics: lintCypherQuery(query, schema).diagnostics.filter(isNotParamError).map((d) => ({
    severity: d.severity === 1 ? 'error' : 'warning',
    message: d.message,
  })),
}));
console.log(JSON.stringify(results));
