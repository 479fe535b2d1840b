// Grafana's types use TypeScript enums (LegendDisplayMode.List, ...); a dashboard saved
// as JSON holds their string values ("list"). Jsonify<T> swaps every string enum for
// the union of its values and keeps everything else, so a JSON literal type-checks
// against the published schema with excess-property checks intact.
export type Jsonify<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Jsonify<U>>
      : T extends object
        ? { [K in keyof T]: Jsonify<T[K]> }
        : T;
