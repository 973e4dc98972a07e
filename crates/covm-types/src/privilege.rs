//! Privileges (vSphere names where one exists) and the built-in roles.
//!
//! A role is a set of privileges; a permission grants a role to a user or group on an inventory object,
//! optionally propagating to everything below it. See DESIGN §7 and `covm-server`'s `app::authz`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! privileges {
    ($($variant:ident => $name:literal,)*) => {
        /// One privilege. Serialized as its dotted name, e.g. `"VirtualMachine.Interact.PowerOn"`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Privilege {
            $(#[serde(rename = $name)] $variant,)*
        }

        impl Privilege {
            /// Every privilege, in a fixed order.
            pub const ALL: &'static [Privilege] = &[$(Privilege::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Privilege::$variant => $name,)*
                }
            }
        }

        impl FromStr for Privilege {
            type Err = String;
            fn from_str(s: &str) -> Result<Privilege, String> {
                match s {
                    $($name => Ok(Privilege::$variant),)*
                    other => Err(format!("unknown privilege {other}")),
                }
            }
        }
    };
}

privileges! {
    SystemView => "System.View",
    SystemRead => "System.Read",
    FolderCreate => "Folder.Create",
    FolderDelete => "Folder.Delete",
    VmInventoryCreate => "VirtualMachine.Inventory.Create",
    VmInventoryDelete => "VirtualMachine.Inventory.Delete",
    VmConfigEdit => "VirtualMachine.Config.Edit",
    VmConfigCpuCount => "VirtualMachine.Config.CPUCount",
    VmConfigMemory => "VirtualMachine.Config.Memory",
    VmConfigAddExistingDisk => "VirtualMachine.Config.AddExistingDisk",
    VmConfigAddNewDisk => "VirtualMachine.Config.AddNewDisk",
    VmConfigRemoveDisk => "VirtualMachine.Config.RemoveDisk",
    VmConfigAddRemoveDevice => "VirtualMachine.Config.AddRemoveDevice",
    VmInteractPowerOn => "VirtualMachine.Interact.PowerOn",
    VmInteractPowerOff => "VirtualMachine.Interact.PowerOff",
    VmInteractReset => "VirtualMachine.Interact.Reset",
    VmInteractConsole => "VirtualMachine.Interact.ConsoleInteract",
    VmStateCreateSnapshot => "VirtualMachine.State.CreateSnapshot",
    VmStateRevertToSnapshot => "VirtualMachine.State.RevertToSnapshot",
    VmStateRemoveSnapshot => "VirtualMachine.State.RemoveSnapshot",
    VmStateRenameSnapshot => "VirtualMachine.State.RenameSnapshot",
    DiskSnapshot => "Disk.Snapshot",
    VmLeaseBreak => "VirtualMachine.Lease.Break",
    VmProvisioningClone => "VirtualMachine.Provisioning.Clone",
    VmProvisioningDeployTemplate => "VirtualMachine.Provisioning.DeployTemplate",
    VmProvisioningMarkAsTemplate => "VirtualMachine.Provisioning.MarkAsTemplate",
    VmProvisioningCustomize => "VirtualMachine.Provisioning.Customize",
    VmGuestModify => "VirtualMachine.GuestOperations.Modify",
    VmGuestQuery => "VirtualMachine.GuestOperations.Query",
    DatastoreConfig => "Datastore.Config",
    DatastoreAllocateSpace => "Datastore.AllocateSpace",
    DatastoreBrowse => "Datastore.Browse",
    DatastoreFileManagement => "Datastore.FileManagement",
    DiskCreate => "Disk.Create",
    DiskDelete => "Disk.Delete",
    DiskExtend => "Disk.Extend",
    DiskAttach => "Disk.Attach",
    ResourceAssignVmToPool => "Resource.AssignVMToPool",
    ResourceCreatePool => "Resource.CreatePool",
    NetworkConfig => "Network.Config",
    NetworkAssign => "Network.Assign",
    PermissionsModify => "Permissions.Modify",
    AuditRead => "Audit.Read",
    UsersManage => "Users.Manage",
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl utoipa::PartialSchema for Privilege {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(Privilege::ALL.iter().map(|p| p.as_str())))
            .into()
    }
}

impl utoipa::ToSchema for Privilege {}

/// The roles every covm has; they cannot be changed or deleted. They mirror VMware Workstation Server's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinRole {
    /// Every privilege.
    Admin,
    /// See and read everything it is granted on.
    ReadOnly,
    /// Nothing; granted below a propagating grant, it takes access away.
    NoAccess,
    /// Use VMs: power and console.
    VmUser,
    /// Create and edit VMs and disks where granted.
    VmCreator,
}

impl BuiltinRole {
    pub const ALL: [BuiltinRole; 5] =
        [BuiltinRole::Admin, BuiltinRole::ReadOnly, BuiltinRole::NoAccess, BuiltinRole::VmUser, BuiltinRole::VmCreator];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinRole::Admin => "Admin",
            BuiltinRole::ReadOnly => "ReadOnly",
            BuiltinRole::NoAccess => "NoAccess",
            BuiltinRole::VmUser => "VMUser",
            BuiltinRole::VmCreator => "VMCreator",
        }
    }

    pub fn privileges(self) -> Vec<Privilege> {
        use Privilege::*;
        let read = [SystemView, SystemRead];
        let user = [VmInteractPowerOn, VmInteractPowerOff, VmInteractReset, VmInteractConsole, VmGuestQuery];
        let creator = [
            VmInventoryCreate,
            VmInventoryDelete,
            VmConfigEdit,
            VmConfigCpuCount,
            VmConfigMemory,
            VmConfigAddExistingDisk,
            VmConfigAddNewDisk,
            VmConfigRemoveDisk,
            VmConfigAddRemoveDevice,
            VmStateCreateSnapshot,
            VmStateRevertToSnapshot,
            VmStateRemoveSnapshot,
            VmStateRenameSnapshot,
            DiskSnapshot,
            DatastoreAllocateSpace,
            DatastoreBrowse,
            DatastoreFileManagement,
            DiskCreate,
            DiskDelete,
            DiskExtend,
            DiskAttach,
            ResourceAssignVmToPool,
            NetworkAssign,
            VmProvisioningClone,
            VmProvisioningDeployTemplate,
            VmProvisioningMarkAsTemplate,
            VmProvisioningCustomize,
            VmGuestModify,
        ];
        match self {
            BuiltinRole::Admin => Privilege::ALL.to_vec(),
            BuiltinRole::ReadOnly => read.to_vec(),
            BuiltinRole::NoAccess => Vec::new(),
            BuiltinRole::VmUser => read.into_iter().chain(user).collect(),
            BuiltinRole::VmCreator => read.into_iter().chain(user).chain(creator).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Privilege::ALL {
            assert_eq!(p.as_str().parse::<Privilege>().unwrap(), *p);
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert!("Bogus.Priv".parse::<Privilege>().is_err());
    }

    #[test]
    fn builtin_roles_nest() {
        let user = BuiltinRole::VmUser.privileges();
        let creator = BuiltinRole::VmCreator.privileges();
        assert!(user.iter().all(|p| creator.contains(p)));
        assert!(!creator.contains(&Privilege::PermissionsModify));
        assert_eq!(BuiltinRole::Admin.privileges().len(), Privilege::ALL.len());
        assert!(BuiltinRole::NoAccess.privileges().is_empty());
    }
}
