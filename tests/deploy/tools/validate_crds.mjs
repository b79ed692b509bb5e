// Validates KEDA and prometheus-operator objects against their CRDs' openAPIV3Schema, as
// compiled into the @kubernetes-models packages. Reads a JSON array of objects on stdin and
// prints a JSON array with one entry per object: null when it is valid, else the errors.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const Model = models[`${obj.apiVersion}/${obj.kind}`];
  if (!Model) return `no CRD schema for ${obj.apiVersion}/${obj.kind}`;
  try {
    new Model(obj).validate();
    return null;
  } catch (e) {
    return String(e.message || e);
  }
});
process.stdout.write(JSON.stringify(results));
