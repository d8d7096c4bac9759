/**
 * The registry of live section types: which sections a VM migrates besides
 * its devices' one-shot state. Not global: each VM (or test) builds its own
 * and gives it to its MigrationSource and MigrationDestination. Adding a
 * section (disks, say) is one register() call where the VM is put together;
 * the state machines never change.
 *
 * Section ids: the live sections that take part in a migration are numbered
 * from FIRST_SECTION_ID in registration order, the device sections after
 * them (the destination maps ids to loaders from the START and FULL headers,
 * so the numbers only need to be unique within one stream).
 */
import type { SectionType } from './section.js';

/** Section id of the first live section (`ram`). */
export const FIRST_SECTION_ID = 2;

export class SectionRegistry {
  readonly #types: SectionType[] = [];

  constructor(types: readonly SectionType[] = []) {
    for (const t of types) this.register(t);
  }

  /** Adds a section type; its (idstr, instance) must be new. */
  register(type: SectionType): this {
    if (this.find(type.idstr, type.instanceId)) {
      throw new Error(`Section '${type.idstr}' instance ${type.instanceId} is already registered`);
    }
    if (type.minVersion > type.version) {
      throw new Error(`Section '${type.idstr}': minimum version ${type.minVersion} is above version ${type.version}`);
    }
    this.#types.push(type);
    return this;
  }

  /** In registration order (the order of the sections on the wire). */
  get types(): readonly SectionType[] {
    return this.#types;
  }

  find(idstr: string, instanceId: number): SectionType | undefined {
    return this.#types.find((t) => t.idstr === idstr && t.instanceId === instanceId);
  }
}
