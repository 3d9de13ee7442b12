import {
  ConfigMap,
  Namespace,
  Secret,
  Service,
  ServiceAccount,
} from "kubernetes-models/v1";
import { DaemonSet, StatefulSet } from "kubernetes-models/apps/v1";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";

import type { KubeObject } from "./kustomize.js";

/** Model classes of kubernetes-models, each validating its JSON schema. */
const models: Record<string, new (data: never) => { validate(): void }> = {
  "v1/Namespace": Namespace,
  "v1/ConfigMap": ConfigMap,
  "v1/Secret": Secret,
  "v1/Service": Service,
  "v1/ServiceAccount": ServiceAccount,
  "apps/v1/DaemonSet": DaemonSet,
  "apps/v1/StatefulSet": StatefulSet,
  "networking.k8s.io/v1/NetworkPolicy": NetworkPolicy,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
};

/**
 * Validates one object against the Kubernetes JSON schema of its kind;
 * throws naming the object and the failing paths.
 */
export function validateObject(object: KubeObject): void {
  const type = `${object.apiVersion}/${object.kind}`;
  const Model = models[type];
  if (Model === undefined) {
    throw new Error(`${type} has no schema in the deploy tests; add its model`);
  }
  try {
    new Model(structuredClone(object) as never).validate();
  } catch (error) {
    throw new Error(
      `${object.kind}/${object.metadata.name}: ${(error as Error).message}`,
      { cause: error },
    );
  }
}
