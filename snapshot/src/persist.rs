//! The one trait every piece of VM state is saved and restored through.

/// Save and restore of a component's state.
///
/// Runtime handles (guest memory, eventfds, files) go in `ConstructorArgs` and are never part of
/// `State`. There are no default methods: a component must say how it saves itself.
pub trait Persist: Sized {
    /// The serializable state of the component.
    type State;
    /// Runtime handles needed to rebuild the component.
    type ConstructorArgs;
    /// Why a restore failed.
    type Error;

    /// Captures the component's state.
    fn save(&self) -> Self::State;
    /// Rebuilds the component from its state and runtime handles.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
