"use strict";
// phoenix.js's `Presence.syncState` / `Presence.syncDiff` (npm phoenix 1.8.17,
// assets/js/phoenix/presence.js) for bench/presclient.js, with the same results, the same
// callback calls in the same order and the same meta order, but without their JSON round-trip
// clones: those clone every joined presence one by one (JSON.parse(JSON.stringify(...))), about
// 10 ms per client for a 1,000-user state and four 500-user diffs, which for 2,000 clients in
// one load generator process is 20 s of CPU, more than the server spends. Here a joined presence
// is copied shallowly ({...presence, metas: [...]}); meta objects are shared, and neither
// function ever modifies a meta or its arguments, so one parsed diff can be applied to every
// client's state.

function syncState(currentState, newState, onJoin, onLeave) {
  const state = Object.create(null);
  for (const key of Object.getOwnPropertyNames(currentState)) {
    const p = currentState[key];
    state[key] = { ...p, metas: p.metas.slice() };
  }
  const joins = Object.create(null);
  const leaves = Object.create(null);
  for (const key of Object.getOwnPropertyNames(state)) {
    if (!Object.hasOwn(newState, key) || !newState[key]) leaves[key] = { ...state[key] };
  }
  for (const key of Object.getOwnPropertyNames(newState)) {
    const newPresence = newState[key];
    const currentPresence = state[key];
    if (currentPresence) {
      const newRefs = newPresence.metas.map((m) => m.phx_ref);
      const curRefs = currentPresence.metas.map((m) => m.phx_ref);
      const joinedMetas = newPresence.metas.filter((m) => curRefs.indexOf(m.phx_ref) < 0);
      const leftMetas = currentPresence.metas.filter((m) => newRefs.indexOf(m.phx_ref) < 0);
      if (joinedMetas.length > 0) joins[key] = { ...newPresence, metas: joinedMetas };
      if (leftMetas.length > 0) leaves[key] = { ...currentPresence, metas: leftMetas };
    } else {
      joins[key] = newPresence;
    }
  }
  return syncDiff(state, { joins, leaves }, onJoin, onLeave);
}

// Applies diff to state in place (phoenix.js does too, after cloning the diff) and returns it.
function syncDiff(state, diff, onJoin, onLeave) {
  const { joins, leaves } = diff;
  for (const key of Object.getOwnPropertyNames(joins)) {
    const newPresence = joins[key];
    const currentPresence = state[key];
    state[key] = { ...newPresence, metas: newPresence.metas.slice() };
    if (currentPresence) {
      const joinedRefs = state[key].metas.map((m) => m.phx_ref);
      const curMetas = currentPresence.metas.filter((m) => joinedRefs.indexOf(m.phx_ref) < 0);
      state[key].metas.unshift(...curMetas);
    }
    if (onJoin) onJoin(key, currentPresence, newPresence);
  }
  for (const key of Object.getOwnPropertyNames(leaves)) {
    const leftPresence = leaves[key];
    const currentPresence = state[key];
    if (!currentPresence) continue;
    const refsToRemove = leftPresence.metas.map((m) => m.phx_ref);
    currentPresence.metas = currentPresence.metas.filter((p) => refsToRemove.indexOf(p.phx_ref) < 0);
    if (onLeave) onLeave(key, currentPresence, leftPresence);
    if (currentPresence.metas.length === 0) delete state[key];
  }
  return state;
}

module.exports = { syncState, syncDiff };
